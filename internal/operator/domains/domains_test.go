package domains

import (
	"strings"
	"testing"

	"github.com/zeitwork/zeitwork/internal/operator/domains/dnstest"
)

func TestCheck(t *testing.T) {
	dns := dnstest.Start(t)
	v := NewVerifier(dns.Addr, "edge.zeitwork.test", []string{"127.0.0.10"})
	tok := NewToken()
	dns.SetCNAME("www.cname.test", "EDGE.zeitwork.test.")
	dns.SetCNAME("www.elsewhere.test", "other.example.net")
	dns.SetTXT("_zeitwork.txt.test", "unrelated", tok)
	dns.SetTXT("_zeitwork.wrongtxt.test", NewToken())
	dns.SetA("apex.test", "127.0.0.10")
	dns.SetA("foreign.test", "127.0.0.99")
	for _, tc := range []struct {
		name   string
		ok     bool
		reason string
	}{
		{"www.cname.test", true, ""},
		{"txt.test", true, ""},
		{"apex.test", true, ""},
		{"www.elsewhere.test", false, "CNAME to other.example.net"},
		{"wrongtxt.test", false, "nothing"},
		{"foreign.test", false, "127.0.0.99"},
		{"missing.test", false, "nothing"},
	} {
		ok, reason := v.Check(t.Context(), tc.name, tok)
		if ok != tc.ok || !strings.Contains(reason, tc.reason) {
			t.Errorf("Check(%s) = %v %q", tc.name, ok, reason)
		}
	}
	rs := v.Records("app.example.com", tok)
	if len(rs) != 3 || rs[0].Type != "CNAME" || rs[0].Value != "edge.zeitwork.test" || rs[1].Type != "A" || rs[2].Name != "_zeitwork.app.example.com" || rs[2].Value != tok {
		t.Fatalf("records %+v", rs)
	}
}
