package console_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/url"
	"regexp"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// TestDomainCertificateShown: the domains section says whether the edges
// hold a certificate for each domain and until when it is valid.
func TestDomainCertificateShown(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u := e.user()
	u.signIn(acmeToken)
	if resp, _ := u.post("/projects", url.Values{"name": {"web"}, "min_instances": {"1"}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("create project: %d", resp.StatusCode)
	}
	for _, name := range []string{"www.acme.test", "api.acme.test"} {
		if resp, _ := u.post("/projects/web/domains", url.Values{"name": {name}}); resp.StatusCode != http.StatusSeeOther {
			t.Fatalf("add %s: %d", name, resp.StatusCode)
		}
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	notAfter := time.Date(2031, 3, 4, 5, 6, 7, 0, time.UTC)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "Test <CA>"}, DNSNames: []string{"www.acme.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	issuer := (&certmagic.ACMEIssuer{CA: certmagic.LetsEncryptProductionCA}).IssuerKey()
	if _, err := e.pool.Exec(t.Context(), "INSERT INTO acme_storage (key, value) VALUES ($1, $2)",
		certmagic.StorageKeys.SiteCert(issuer, "www.acme.test"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})); err != nil {
		t.Fatal(err)
	}
	_, page := u.get("/projects/web")
	article := func(name string) string {
		return regexp.MustCompile(`(?s)<article class="domain" id="domain-` + regexp.QuoteMeta(name) + `".*?</article>`).FindString(page)
	}
	issued := regexp.MustCompile(`Certificate: issued, valid until <time datetime="2031-03-04T05:06:07Z"[^>]*>2031-03-04 05:06:07 UTC</time> <span class="issuer">\(Test &lt;CA&gt;\)</span>`)
	if !issued.MatchString(article("www.acme.test")) {
		t.Fatalf("no issued certificate: %s", article("www.acme.test"))
	}
	if !regexp.MustCompile(`Certificate: not issued yet</p>`).MatchString(article("api.acme.test")) {
		t.Fatalf("no missing certificate: %s", article("api.acme.test"))
	}
}
