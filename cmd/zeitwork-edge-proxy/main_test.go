package main

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/devcluster"
	"github.com/zeitwork/zeitwork/internal/servicetest"
)

func TestBinary(t *testing.T) {
	bin := servicetest.Binary(t, "zeitwork-edge-proxy")
	servicetest.ExpectBadConfig(t, bin, map[string]string{"SSL_CERT_PATH": "/nonexistent/cert.pem", "RATE_LIMIT_RPS": "fast", "TRUSTED_PROXIES": "nope"},
		"SSL_CERT_PATH", "SSL_KEY_PATH", "RATE_LIMIT_RPS", "TRUSTED_PROXIES")
	ca, err := devcluster.EnsureCA(filepath.Join(t.TempDir(), "ca"), "zeitwork.test")
	if err != nil {
		t.Fatal(err)
	}
	https, http := servicetest.FreeAddr(t), servicetest.FreeAddr(t)
	p := servicetest.Start(t, bin, map[string]string{"HTTPS_ADDR": https, "HTTP_ADDR": http, "SSL_CERT_PATH": ca.WildcardCert,
		"SSL_KEY_PATH": ca.WildcardKey, "STATE_DIR": t.TempDir(), "APPS_DOMAIN": "zeitwork.test"}, servicetest.URL(http)+"/health")
	servicetest.CheckContract(t, bin, p, servicetest.URL(http), "zeitwork_edge_proxy")
	if _, body := servicetest.Get(t, servicetest.URL(http)+"/metrics"); !strings.Contains(body, "zeitwork_edge_proxy_certificate_expiry_seconds") {
		t.Fatal("no certificate expiry metric")
	}
	p.StopOK(t, 30*time.Second)
}
