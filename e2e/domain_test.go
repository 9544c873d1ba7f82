package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/acmetest"
	"github.com/zeitwork/zeitwork/internal/devcluster"
)

// TestCustomDomain adds a customer domain with the CLI, verifies it
// against DNS answers the test controls, and reaches the app on it over
// HTTPS through the load balancer with a certificate a local Pebble issued
// (validated through the load balancer too).
func TestCustomDomain(t *testing.T) {
	dns := acmetest.StartDNS(t)
	pebble := acmetest.StartPebble(t, 8085, 8082, dns.Addr)
	s := startCluster(t, devcluster.Config{
		Env: map[string]string{"DNS_RESOLVER": dns.Addr, "DEPLOY_TIMEOUT": "180s"},
		EdgeEnv: map[string]string{"ACME_DIRECTORY_URL": pebble.DirectoryURL, "ACME_CA_ROOT": pebble.ServerCA,
			"ACME_HTTP_PORT": "8085", "ACME_TLS_PORT": "8082", "ACME_EMAIL": "ops@zeitwork.test"},
	})
	ref := s.push("domain", map[string]string{"APP_VERSION": "custom"})
	if code, out, errs := s.cli("projects", "create", "shop", "--health-path", "/healthz", "--min-instances", "1"); code != 0 {
		t.Fatalf("%s %s", out, errs)
	}
	if code, out, errs := s.cli("deploy", "--project", "shop", "--image", ref); code != 0 {
		t.Fatalf("deploy: %s %s", out, errs)
	}
	code, out, errs := s.cli("domains", "add", "app.example.test", "--project", "shop", "--json")
	if code != 0 {
		t.Fatalf("domains add: %s %s", out, errs)
	}
	var d struct {
		DNSRecords []struct{ Type, Name, Value string } `json:"dns_records"`
	}
	_ = json.Unmarshal([]byte(out), &d)
	token := ""
	for _, r := range d.DNSRecords {
		if r.Type == "TXT" && r.Name == "_zeitwork.app.example.test" {
			token = r.Value
		}
	}
	if token == "" {
		t.Fatalf("no TXT record to create in %s", out)
	}
	// Before DNS is set up, verification fails with a clear exit code.
	if code, out, _ := s.cli("domains", "verify", "app.example.test"); code == 0 {
		t.Fatalf("verified without DNS records: %s", out)
	}
	dns.SetTXT("_zeitwork.app.example.test", token)
	dns.SetA("app.example.test", s.c.Regions[0].IP)
	if code, out, errs := s.cli("domains", "verify", "app.example.test"); code != 0 || !strings.Contains(out, "verified=true") {
		t.Fatalf("verify: %d %s %s", code, out, errs)
	}
	client := &http.Client{Timeout: 90 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", net.JoinHostPort(s.c.Regions[0].IP, "8082"))
		},
		TLSClientConfig: &tls.Config{RootCAs: pebble.IssuerRoots()},
	}}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		code, body, err := get(client, "https://app.example.test/")
		if err == nil && code == 200 && strings.Contains(body, "hello from custom") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("custom domain over HTTPS: %d %q %v", code, body, err)
		}
		time.Sleep(time.Second)
	}
}
