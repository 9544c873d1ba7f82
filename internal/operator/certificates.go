package operator

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"regexp"
	"strings"
	"time"
)

// DomainCertificate is the state of a custom domain's TLS certificate as
// the edge proxies' certmagic storage (acme_storage) holds it.
type DomainCertificate struct {
	State    string     `json:"state"` // none | issued | expired
	NotAfter *time.Time `json:"not_after,omitempty"`
	Issuer   string     `json:"issuer,omitempty"` // the issuing CA's common name
}

// certKeyComponent is certmagic's KeyBuilder.Safe (certmagic v0.25
// storage.go): a domain as one component of a storage key. certmagic keeps
// a site's certificate at certificates/<Safe(issuer key)>/<Safe(domain)>/
// <Safe(domain)>.crt (KeyBuilder.SiteCert); the issuer key derives from
// the ACME directory URL, which the operator does not know, so any issuer
// matches. A test checks this against certmagic itself.
func certKeyComponent(s string) string {
	s = strings.TrimSpace(strings.ToLower(s))
	s = strings.NewReplacer(" ", "_", "+", "_plus_", "*", "wildcard_", ":", "-", "..", "").Replace(s)
	return certKeyUnsafe.ReplaceAllLiteralString(s, "")
}

var certKeyUnsafe = regexp.MustCompile(`[^\w@.-]`)

// certificate reads the domain's certificate from acme_storage: of the
// certificates stored under any issuer, the one valid longest.
func (o *Operator) certificate(ctx context.Context, domain string) (*DomainCertificate, error) {
	rows, err := o.pool.Query(ctx, Q("DomainCertificates"), certKeyComponent(domain))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var best *x509.Certificate
	for rows.Next() {
		var pemBytes []byte
		if err := rows.Scan(&pemBytes); err != nil {
			return nil, err
		}
		if c := firstCertificate(pemBytes); c != nil && (best == nil || c.NotAfter.After(best.NotAfter)) {
			best = c
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if best == nil {
		return &DomainCertificate{State: "none"}, nil
	}
	na := best.NotAfter.UTC()
	out := &DomainCertificate{State: "issued", NotAfter: &na, Issuer: best.Issuer.CommonName}
	if time.Now().After(na) {
		out.State = "expired"
	}
	return out, nil
}

// firstCertificate parses the first CERTIFICATE block of a PEM bundle (the
// leaf, in certmagic's chain), or returns nil.
func firstCertificate(b []byte) *x509.Certificate {
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil
		}
		if block.Type == "CERTIFICATE" {
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil
			}
			return c
		}
	}
}
