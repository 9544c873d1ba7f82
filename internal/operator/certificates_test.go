package operator

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// TestCertKeyComponent: the operator names a domain's storage key the way
// certmagic does.
func TestCertKeyComponent(t *testing.T) {
	for _, s := range []string{"www.example.com", "WWW.Example.COM ", "*.example.com", "xn--bcher-kva.example", "a..b", "a+b:c d/e"} {
		if got, want := certKeyComponent(s), certmagic.StorageKeys.Safe(s); got != want {
			t.Errorf("certKeyComponent(%q) = %q, certmagic has %q", s, got, want)
		}
	}
}

// selfSigned is a PEM certificate for name issued by (and to) cn.
func selfSigned(t *testing.T, name, cn string, notAfter time.Time) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, DNSNames: []string{name},
		NotBefore: notAfter.Add(-90 * 24 * time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// TestDomainCertificate: a domain document reports the certificate the
// edges stored in acme_storage (certmagic's layout), an expired one, or
// none; another organisation sees nothing of it.
func TestDomainCertificate(t *testing.T) {
	t.Parallel()
	e := lightEnv(t)
	tok, err := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	if err != nil {
		t.Fatal(err)
	}
	other, _ := e.ops[0].Bootstrap(t.Context(), "other", "ops@other.test", "t")
	if code := e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web"}, nil); code != 201 {
		t.Fatalf("create project: %d", code)
	}
	doms := map[string]Domain{}
	for _, name := range []string{"www.example.com", "old.example.com", "new.example.com"} {
		var d Domain
		if code := e.call(tok, "POST", "/api/v1/projects/web/domains", map[string]any{"name": name}, &d); code != 201 {
			t.Fatalf("add %s: %d", name, code)
		}
		doms[name] = d
	}
	issuer := (&certmagic.ACMEIssuer{CA: certmagic.LetsEncryptProductionCA}).IssuerKey()
	store := func(key string, value []byte) {
		t.Helper()
		if _, err := e.ops[0].pool.Exec(t.Context(), "INSERT INTO acme_storage (key, value) VALUES ($1, $2)", key, value); err != nil {
			t.Fatal(err)
		}
	}
	valid := time.Now().Add(60 * 24 * time.Hour).UTC().Truncate(time.Second)
	store(certmagic.StorageKeys.SiteCert(issuer, "www.example.com"), selfSigned(t, "www.example.com", "Test CA R1", valid))
	store(certmagic.StorageKeys.SitePrivateKey(issuer, "www.example.com"), []byte("not a certificate"))
	store(certmagic.StorageKeys.SiteCert(issuer, "old.example.com"), selfSigned(t, "old.example.com", "Old CA", time.Now().Add(-time.Hour)))
	// Another domain's certificate, and a name that only shares a prefix.
	store(certmagic.StorageKeys.SiteCert(issuer, "new.example.com.evil"), selfSigned(t, "x", "Evil", valid))

	var d Domain
	if code := e.call(tok, "GET", "/api/v1/domains/"+doms["www.example.com"].ID.String(), nil, &d); code != 200 {
		t.Fatalf("get domain: %d", code)
	}
	if c := d.Certificate; c == nil || c.State != "issued" || c.NotAfter == nil || !c.NotAfter.Equal(valid) || c.Issuer != "Test CA R1" {
		t.Fatalf("issued certificate: %+v", c)
	}
	var list struct{ Domains []Domain }
	e.call(tok, "GET", "/api/v1/projects/web/domains", nil, &list)
	got := map[string]string{}
	for _, d := range list.Domains {
		got[d.Name] = d.Certificate.State
	}
	if got["www.example.com"] != "issued" || got["old.example.com"] != "expired" || got["new.example.com"] != "none" {
		t.Fatalf("certificate states: %v", got)
	}
	var none Domain
	e.call(tok, "GET", "/api/v1/domains/"+doms["new.example.com"].ID.String(), nil, &none)
	if c := none.Certificate; c == nil || c.State != "none" || c.NotAfter != nil || c.Issuer != "" {
		t.Fatalf("no certificate: %+v", c)
	}
	if code := e.call(other, "GET", "/api/v1/domains/"+doms["www.example.com"].ID.String(), nil, nil); code != 404 {
		t.Fatalf("another organisation's domain: %d", code)
	}
}
