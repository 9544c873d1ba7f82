package edge

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/acmetest"
	"github.com/zeitwork/zeitwork/internal/devcluster"
	"github.com/zeitwork/zeitwork/internal/edge/routetable"
	"github.com/zeitwork/zeitwork/internal/pgtest"
	"github.com/zeitwork/zeitwork/internal/service"
)

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestACMEOnDemand: a verified custom domain gets a certificate from a
// local Pebble on its first handshake; an unverified one gets none; a
// second edge sharing the PostgreSQL storage serves the same certificate
// without issuing again.
func TestACMEOnDemand(t *testing.T) {
	dbURL := pgtest.URL(t)
	dns := acmetest.StartDNS(t)
	dns.SetA("app.customer.test", "127.0.0.1")
	dns.SetA("unverified.customer.test", "127.0.0.1")
	httpsPort, httpPort := freePort(t), freePort(t)
	pebble := acmetest.StartPebble(t, httpPort, httpsPort, dns.Addr)

	dir := t.TempDir()
	ca, err := devcluster.EnsureCA(filepath.Join(dir, "ca"), "zeitwork.test")
	if err != nil {
		t.Fatal(err)
	}
	op := newFakeOperator(t)
	node := fakeNode(t, "node-a")
	op.table.Store(&routetable.Table{Version: "1", Routes: []routetable.Route{
		{Host: "app.customer.test", Kind: "custom", DeploymentID: "d1", Instances: []routetable.Instance{{ID: "i1", NodeAddress: node.URL, Healthy: true}}},
	}})
	regs := map[string]*prometheus.Registry{}
	start := func(name, httpsAddr, httpAddr string) string {
		u, _ := urlParse(op.srv.URL)
		cfg := ServiceConfig{
			HTTPSAddr: httpsAddr, HTTPAddr: httpAddr, Region: "test", ID: name, CertFile: ca.WildcardCert, KeyFile: ca.WildcardKey,
			StateDir: filepath.Join(dir, name), Drain: time.Second, Operators: nil,
			Proxy: Config{AppsDomain: "zeitwork.test", ClusterToken: token},
			ACME:  ACMEConfig{DirectoryURL: pebble.DirectoryURL, CARoot: pebble.ServerCA, DatabaseURL: dbURL, Email: "ops@zeitwork.test", HTTPPort: httpPort, TLSPort: httpsPort},
		}
		cfg.Operators = append(cfg.Operators, u)
		ctx, cancel := context.WithCancel(context.Background())
		regs[name] = prometheus.NewRegistry()
		srv, err := NewServer(ctx, cfg, regs[name], service.NewHealth(name), slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		srv.Routes.Wait = time.Second
		done := make(chan error, 1)
		go func() { done <- srv.Run(ctx, nil) }()
		t.Cleanup(func() { cancel(); <-done })
		for srv.Routes.Table().Lookup("app.customer.test") == nil {
			time.Sleep(20 * time.Millisecond)
		}
		h, _ := srv.Addrs()
		return h.String()
	}
	edge1 := start("edge-1", "127.0.0.1:"+strconv.Itoa(httpsPort), "127.0.0.1:"+strconv.Itoa(httpPort))
	edge2 := start("edge-2", "127.0.0.1:0", "127.0.0.1:0")

	handshake := func(addr, name string) (*tls.ConnectionState, error) {
		d := &net.Dialer{Timeout: 90 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{ServerName: name, RootCAs: pebble.IssuerRoots()})
		if err != nil {
			return nil, err
		}
		defer c.Close()
		st := c.ConnectionState()
		return &st, nil
	}
	st1, err := handshake(edge1, "app.customer.test")
	if err != nil {
		t.Fatalf("verified domain: %v", err)
	}
	leaf := st1.PeerCertificates[0]
	if leaf.VerifyHostname("app.customer.test") != nil {
		t.Fatalf("certificate for %v", leaf.DNSNames)
	}
	if _, err := handshake(edge1, "unverified.customer.test"); err == nil {
		t.Fatal("a certificate was issued for a domain that is not verified")
	}
	st2, err := handshake(edge2, "app.customer.test")
	if err != nil {
		t.Fatalf("second edge: %v", err)
	}
	if st2.PeerCertificates[0].SerialNumber.Cmp(leaf.SerialNumber) != 0 {
		t.Fatal("the second edge issued its own certificate instead of using the shared one")
	}
	// And the request itself is served, with HSTS on the customer domain.
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", edge2)
		},
		TLSClientConfig: &tls.Config{RootCAs: pebble.IssuerRoots()},
	}}
	resp, err := client.Get("https://app.customer.test/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Strict-Transport-Security") == "" {
		t.Fatalf("custom domain over HTTPS: %d %v", resp.StatusCode, resp.Header)
	}
	// /metrics: edge-1 ordered the certificate, edge-2 loaded it from the
	// shared storage; both report when the one they serve expires.
	exp, orders := expiries(t, regs["edge-1"])
	if orders["obtained"] != 1 || orders["failed"] != 0 {
		t.Errorf("edge-1 ACME orders: %v", orders)
	}
	if left := time.Until(leaf.NotAfter).Seconds(); exp["acme"] <= 0 || exp["acme"] > left+60 || exp["wildcard"] <= 0 {
		t.Errorf("edge-1 expiry: %v (certificate: %.0fs left)", exp, left)
	}
	if exp, orders := expiries(t, regs["edge-2"]); orders["obtained"] != 0 || exp["acme"] <= 0 {
		t.Errorf("edge-2: expiry %v, orders %v", exp, orders)
	}
}
