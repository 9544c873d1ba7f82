// Package domains verifies that a customer controls a domain before it
// routes: a CNAME to the edge hostname, A/AAAA records that are all edge
// addresses, or a "_zeitwork.<domain>" TXT record carrying the domain's
// token. It also says which records to create.
package domains

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"slices"
	"strings"
)

// Record is a DNS record the customer creates (any one of them verifies).
type Record struct {
	Type  string `json:"type"`
	Name  string `json:"name"`
	Value string `json:"value"`
	Note  string `json:"note"`
}

// Verifier checks domains against DNS.
type Verifier struct {
	res          *net.Resolver
	edgeHostname string
	edgeIPs      []string
}

// NewVerifier asks resolver ("host:port"; empty for the system's) about
// domains pointing at edgeHostname or at edgeIPs.
func NewVerifier(resolver, edgeHostname string, edgeIPs []string) *Verifier {
	v := &Verifier{res: net.DefaultResolver, edgeHostname: canonical(edgeHostname), edgeIPs: edgeIPs}
	if resolver != "" {
		v.res = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, resolver)
		}}
	}
	return v
}

// NewToken returns a fresh verification token.
func NewToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return "zeitwork-verify=" + hex.EncodeToString(b[:])
}

// Records lists what the customer may create for name.
func (v *Verifier) Records(name, token string) []Record {
	rs := []Record{
		{Type: "CNAME", Name: name, Value: v.edgeHostname, Note: "routes traffic to Zeitwork and verifies the domain"},
	}
	for _, ip := range v.edgeIPs {
		t := "A"
		if net.ParseIP(ip).To4() == nil {
			t = "AAAA"
		}
		rs = append(rs, Record{Type: t, Name: name, Value: ip, Note: "for an apex domain that cannot have a CNAME"})
	}
	return append(rs, Record{Type: "TXT", Name: "_zeitwork." + name, Value: token, Note: "verifies the domain before traffic moves (e.g. while it still points elsewhere)"})
}

// Check reports whether name is verified and, when it is not, why.
func (v *Verifier) Check(ctx context.Context, name, token string) (bool, string) {
	if txts, err := v.res.LookupTXT(ctx, "_zeitwork."+name); err == nil && slices.Contains(txts, token) {
		return true, ""
	}
	cname, err := v.res.LookupCNAME(ctx, name)
	if err == nil && canonical(cname) == v.edgeHostname {
		return true, ""
	}
	if len(v.edgeIPs) > 0 {
		ips, err := v.res.LookupHost(ctx, name)
		if err == nil && len(ips) > 0 && allIn(ips, v.edgeIPs) {
			return true, ""
		}
	}
	found := "nothing"
	if err == nil && canonical(cname) != canonical(name) {
		found = "a CNAME to " + canonical(cname)
	} else if ips, err := v.res.LookupHost(ctx, name); err == nil && len(ips) > 0 {
		found = "addresses " + strings.Join(ips, ", ")
	}
	return false, fmt.Sprintf("found %s; want a CNAME %s → %s or a TXT _zeitwork.%s with the verification token", found, name, v.edgeHostname, name)
}

func canonical(s string) string { return strings.TrimSuffix(strings.ToLower(s), ".") }

func allIn(ips, allowed []string) bool {
	for _, ip := range ips {
		if !slices.ContainsFunc(allowed, func(a string) bool { return net.ParseIP(a).Equal(net.ParseIP(ip)) }) {
			return false
		}
	}
	return true
}
