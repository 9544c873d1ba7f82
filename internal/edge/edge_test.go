package edge

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/devcluster"
	"github.com/zeitwork/zeitwork/internal/edge/routetable"
	"github.com/zeitwork/zeitwork/internal/proxyproto"
	"github.com/zeitwork/zeitwork/internal/service"
)

const token = "edge-test-token"

// fakeNode plays a node agent's data plane: it checks the instance
// headers and answers as the app.
func fakeNode(t *testing.T, name string) *httptest.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		for {
			typ, b, err := c.Read(r.Context())
			if err != nil {
				return
			}
			_ = c.Write(r.Context(), typ, append([]byte("echo: "), b...))
		}
	})
	mux.HandleFunc("/sse", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			fmt.Fprintf(w, "data: %d\n\n", i)
			w.(http.Flusher).Flush()
			time.Sleep(300 * time.Millisecond)
		}
	})
	addFramingHandlers(mux, name)
	mux.HandleFunc("/echo-body", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Got-Trailer")
		b, _ := io.ReadAll(r.Body)
		_, _ = w.Write(b)
		w.Header().Set("X-Got-Trailer", r.Trailer.Get("X-Checksum"))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s instance=%s xff=%s proto=%s fhost=%s real=%s rid=%t", name, r.Header.Get("X-Zeitwork-Instance"),
			r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"), r.Header.Get("X-Forwarded-Host"),
			r.Header.Get("X-Real-IP"), r.Header.Get("X-Request-Id") != "")
	})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Zeitwork-Token") != token {
			http.Error(w, "bad token", http.StatusUnauthorized)
			return
		}
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv
}

type fakeOperator struct {
	srv   *httptest.Server
	table atomic.Pointer[routetable.Table]
	up    atomic.Bool
}

func newFakeOperator(t *testing.T) *fakeOperator {
	f := &fakeOperator{}
	f.up.Store(true)
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !f.up.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		if r.Header.Get("Authorization") != "Bearer "+token {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		if r.URL.Path == "/api/v1/routes" {
			deadline := time.Now().Add(2 * time.Second)
			for f.table.Load().Version == r.URL.Query().Get("version") && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			_ = json.NewEncoder(w).Encode(f.table.Load())
			return
		}
		w.WriteHeader(200)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

type edgeEnv struct {
	srv         *Server
	https, http string
	ca          *x509.CertPool
	op          *fakeOperator
	nodeA       *httptest.Server
	reg         *prometheus.Registry
	// stop ends Run (drain included) and returns its error; it runs at
	// cleanup too.
	stop func() error
}

// startEdge starts an edge; opts adjust the server before it runs.
func startEdge(t *testing.T, rps float64, burst int, opts ...func(*Server)) *edgeEnv {
	dir := t.TempDir()
	ca, err := devcluster.EnsureCA(filepath.Join(dir, "ca"), "zeitwork.test")
	if err != nil {
		t.Fatal(err)
	}
	op := newFakeOperator(t)
	a, b := fakeNode(t, "node-a"), fakeNode(t, "node-b")
	op.table.Store(&routetable.Table{Version: "1", Routes: []routetable.Route{
		{Host: "web-abc1234-acme.zeitwork.test", Kind: "versioned", DeploymentID: "d1", Instances: []routetable.Instance{
			{ID: "i1", NodeAddress: a.URL, Healthy: true}, {ID: "i2", NodeAddress: b.URL, Healthy: true}}},
		{Host: "down-abc1234-acme.zeitwork.test", Kind: "versioned", DeploymentID: "d2", Instances: []routetable.Instance{{ID: "i3", NodeAddress: a.URL, Healthy: false}}},
		{Host: "app.customer.test", Kind: "custom", DeploymentID: "d1", Instances: []routetable.Instance{{ID: "i1", NodeAddress: a.URL, Healthy: true}}},
	}})
	trusted, _ := proxyproto.ParseTrusted([]string{"127.0.0.2"})
	cfg := ServiceConfig{
		HTTPSAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", Region: "test", ID: "edge-test",
		CertFile: ca.WildcardCert, KeyFile: ca.WildcardKey, Trusted: trusted, StateDir: dir, Drain: 2 * time.Second,
		Proxy: Config{AppsDomain: "zeitwork.test", ClusterToken: token, RateRPS: rps, RateBurst: burst, MaxBodyBytes: 1 << 20},
	}
	u, _ := urlParse(op.srv.URL)
	cfg.Operators = append(cfg.Operators, u)
	reg := prometheus.NewRegistry()
	srv, err := NewServer(t.Context(), cfg, reg, service.NewHealth("edge"), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	srv.Routes.Wait = time.Second
	for _, o := range opts {
		o(srv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, nil) }()
	var once sync.Once
	var runErr error
	stop := func() error { once.Do(func() { cancel(); runErr = <-done }); return runErr }
	t.Cleanup(func() { _ = stop() })
	h, p := srv.Addrs()
	pem, _ := os.ReadFile(ca.CertFile)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	e := &edgeEnv{srv: srv, https: h.String(), http: p.String(), ca: pool, op: op, nodeA: a, reg: reg, stop: stop}
	deadline := time.Now().Add(10 * time.Second)
	for srv.Routes.Table().Lookup("web-abc1234-acme.zeitwork.test") == nil {
		if time.Now().After(deadline) {
			t.Fatal("route table never synced")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return e
}

// clientProto speaks HTTP/2 or, with h2 false, HTTP/1.1 (the fast path's
// side) to the edge's HTTPS port, from the local address from.
func (e *edgeEnv) clientProto(from string, h2 bool) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	tr := &http.Transport{
		DialContext:     func(ctx context.Context, _, _ string) (net.Conn, error) { return d.DialContext(ctx, "tcp", e.https) },
		TLSClientConfig: &tls.Config{RootCAs: e.ca}, ForceAttemptHTTP2: h2,
	}
	if !h2 {
		tr.TLSClientConfig.NextProtos = []string{"http/1.1"}
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: tr}
}

// protos runs f once over HTTP/2 and once over HTTP/1.1.
func protos(t *testing.T, f func(t *testing.T, h2 bool)) {
	for _, h2 := range []bool{true, false} {
		name := "http1"
		if h2 {
			name = "h2"
		}
		t.Run(name, func(t *testing.T) { f(t, h2) })
	}
}

func get(t *testing.T, c *http.Client, url string) (int, string, http.Header) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

func TestRoutingTLSAndHeaders(t *testing.T) {
	e := startEdge(t, 1000, 1000)
	protos(t, func(t *testing.T, h2 bool) { routingTLSAndHeaders(t, e, e.clientProto("", h2), h2) })

	// A failing instance: idempotent requests are retried on the other.
	e.nodeA.Close()
	protos(t, func(t *testing.T, h2 bool) {
		c := e.clientProto("", h2)
		for range 20 {
			if code, body, _ := get(t, c, "https://web-abc1234-acme.zeitwork.test/"); code != 200 || !strings.HasPrefix(body, "node-b") {
				t.Fatalf("with node-a down: %d %s", code, body)
			}
		}
	})

	// Operator down: the last known table keeps serving.
	e.op.up.Store(false)
	time.Sleep(1500 * time.Millisecond)
	protos(t, func(t *testing.T, h2 bool) {
		if code, _, _ := get(t, e.clientProto("", h2), "https://web-abc1234-acme.zeitwork.test/"); code != 200 {
			t.Fatalf("with the operator down: %d", code)
		}
	})
	if _, body := httpGet(t, "http://"+e.http+"/health"); !strings.Contains(body, "route_table_staleness_seconds") {
		t.Fatal("staleness not reported")
	}
}

func routingTLSAndHeaders(t *testing.T, e *edgeEnv, c *http.Client, h2 bool) {
	code, body, hdr := get(t, c, "https://web-abc1234-acme.zeitwork.test/")
	if code != 200 || !strings.Contains(body, "instance=i") || !strings.Contains(body, "proto=https") ||
		!strings.Contains(body, "fhost=web-abc1234-acme.zeitwork.test") || !strings.Contains(body, "real=127.0.0.1") || !strings.Contains(body, "rid=true") {
		t.Fatalf("%d %s", code, body)
	}
	if hdr.Get("X-Request-Id") == "" {
		t.Fatal("no X-Request-Id in the response")
	}
	resp, _ := c.Get("https://web-abc1234-acme.zeitwork.test/")
	if wantMajor := map[bool]int{true: 2, false: 1}[h2]; resp.TLS.Version < tls.VersionTLS12 || resp.ProtoMajor != wantMajor {
		t.Fatalf("TLS %x, proto %s", resp.TLS.Version, resp.Proto)
	}
	resp.Body.Close()
	// Both instances serve.
	seen := map[string]bool{}
	for range 40 {
		_, body, _ := get(t, c, "https://web-abc1234-acme.zeitwork.test/")
		seen[strings.Fields(body)[0]] = true
	}
	if !seen["node-a"] || !seen["node-b"] {
		t.Fatalf("balancing: %v", seen)
	}
	// X-Forwarded-For is appended, never overwritten.
	req, _ := http.NewRequest("GET", "https://web-abc1234-acme.zeitwork.test/", nil)
	req.Header.Set("X-Forwarded-For", "203.0.113.9")
	r2, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(r2.Body)
	r2.Body.Close()
	if !strings.Contains(string(b), "xff=203.0.113.9, 127.0.0.1") {
		t.Fatalf("XFF: %s", b)
	}
	if code, body, _ := get(t, c, "https://nope.zeitwork.test/"); code != 404 || !strings.Contains(body, "no Zeitwork deployment") {
		t.Fatalf("unknown host: %d %s", code, body)
	}
	if code, _, hdr := get(t, c, "https://down-abc1234-acme.zeitwork.test/"); code != 503 || hdr.Get("Retry-After") == "" {
		t.Fatalf("no healthy instance: %d %v", code, hdr)
	}
	// Plain HTTP: customer domains redirect to HTTPS with path and query.
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	req, _ = http.NewRequest("GET", "http://"+e.http+"/a/b?c=d", nil)
	req.Host = "app.customer.test"
	r3, err := noFollow.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r3.Body.Close()
	if r3.StatusCode != 308 || r3.Header.Get("Location") != "https://app.customer.test/a/b?c=d" {
		t.Fatalf("redirect: %d %s", r3.StatusCode, r3.Header.Get("Location"))
	}
	req, _ = http.NewRequest("GET", "http://"+e.http+"/", nil)
	req.Host = "web-abc1234-acme.zeitwork.test"
	r4, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(r4.Body)
	r4.Body.Close()
	if r4.StatusCode != 200 || !strings.Contains(string(b), "proto=http ") {
		t.Fatalf("plain HTTP: %d %s", r4.StatusCode, b)
	}
	if code, body := httpGet(t, "http://"+e.http+"/health"); code != 200 || !strings.Contains(body, "route_table_version") {
		t.Fatalf("/health: %d %s", code, body)
	}
	// Body limit.
	big := strings.NewReader(strings.Repeat("x", 2<<20))
	r5, err := c.Post("https://web-abc1234-acme.zeitwork.test/", "text/plain", big)
	if err != nil {
		t.Fatal(err)
	}
	r5.Body.Close()
	if r5.StatusCode != 413 {
		t.Fatalf("oversized body: %d", r5.StatusCode)
	}
	// WebSocket echo and SSE pass through.
	ws, _, err := websocket.Dial(t.Context(), "wss://web-abc1234-acme.zeitwork.test/ws", &websocket.DialOptions{HTTPClient: e.h1client()})
	if err != nil {
		t.Fatal(err)
	}
	_ = ws.Write(t.Context(), websocket.MessageText, []byte("hi"))
	_, msg, err := ws.Read(t.Context())
	if err != nil || string(msg) != "echo: hi" {
		t.Fatalf("websocket: %q %v", msg, err)
	}
	ws.Close(websocket.StatusNormalClosure, "")
	r6, err := c.Get("https://web-abc1234-acme.zeitwork.test/sse")
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(r6.Body)
	start := time.Now()
	first, _ := br.ReadString('\n')
	if first != "data: 0\n" || time.Since(start) > 250*time.Millisecond*4 {
		t.Fatalf("SSE first event %q after %s", first, time.Since(start))
	}
	rest, _ := io.ReadAll(br)
	r6.Body.Close()
	if !strings.Contains(string(rest), "data: 2") {
		t.Fatalf("SSE: %q", rest)
	}
}

func (e *edgeEnv) h1client() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", e.https)
		},
		TLSClientConfig: &tls.Config{RootCAs: e.ca, NextProtos: []string{"http/1.1"}},
	}}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestRateLimitPerClient(t *testing.T) {
	protos(t, rateLimitPerClient)
}

func rateLimitPerClient(t *testing.T, h2 bool) {
	e := startEdge(t, 2, 3)
	a, b := e.clientProto("127.0.0.1", h2), e.clientProto("127.0.0.3", h2)
	limited := false
	for range 10 {
		code, _, hdr := get(t, a, "https://web-abc1234-acme.zeitwork.test/")
		if code == 429 {
			if hdr.Get("Retry-After") == "" {
				t.Fatal("429 without Retry-After")
			}
			limited = true
			break
		}
	}
	if !limited {
		t.Fatal("client never limited")
	}
	if code, _, _ := get(t, b, "https://web-abc1234-acme.zeitwork.test/"); code != 200 {
		t.Fatalf("another client was limited: %d", code)
	}
	_, body := httpGet(t, "http://"+e.http+"/api/v1/rate-limit/status")
	if !strings.Contains(body, `"client":"127.0.0.1"`) {
		t.Fatalf("status: %s", body)
	}
}

// TestProxyProtocolTrust: a PROXY header from the trusted LB address sets
// the client IP; the same header from anyone else is rejected.
func TestProxyProtocolTrust(t *testing.T) {
	e := startEdge(t, 1000, 1000)
	send := func(from string) (string, error) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", e.http)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		hdr := proxyproto.AppendProxy(nil, 2, netip.MustParseAddrPort("198.51.100.7:5555"), netip.MustParseAddrPort("127.0.0.1:8083"))
		c.Write(hdr)
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: web-abc1234-acme.zeitwork.test\r\nConnection: close\r\n\r\n")
		b, err := io.ReadAll(c)
		return string(b), err
	}
	body, err := send("127.0.0.2")
	if err != nil || !strings.Contains(body, "real=198.51.100.7") {
		t.Fatalf("trusted: %q %v", body, err)
	}
	body, _ = send("127.0.0.4")
	if strings.Contains(body, "200 OK") {
		t.Fatalf("untrusted PROXY header accepted: %q", body)
	}
}

func FuzzHostOf(f *testing.F) {
	for _, s := range []string{"a.b", "A.B:443", "[::1]:80", "x.", "", ":", "a:b:c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		h := hostOf(s)
		if h != strings.ToLower(h) || strings.HasSuffix(h, ".") && h != "" && !strings.HasSuffix(s, "..") {
			t.Fatalf("hostOf(%q) = %q", s, h)
		}
	})
}
