package edge

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// countConns counts the connections srv accepts.
func countConns(srv *httptest.Server) *atomic.Int64 {
	var n atomic.Int64
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			n.Add(1)
		}
	}
	return &n
}

func roundTrip(t *testing.T, u *upstream, method, url string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	resp, err := u.RoundTrip(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("%s %s: body: %v", method, url, err)
	}
	return resp, string(b)
}

func TestUpstreamKeepAliveAndBodies(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/chunked":
			w.Header().Set("Trailer", "X-Sum")
			for i := range 3 {
				fmt.Fprintf(w, "part%d;", i)
				w.(http.Flusher).Flush()
			}
			w.Header().Set("X-Sum", "3")
		case "/length":
			w.Header().Set("Content-Length", "5")
			_, _ = io.WriteString(w, "hello")
		case "/204":
			w.WriteHeader(http.StatusNoContent)
		case "/304":
			w.WriteHeader(http.StatusNotModified)
		default:
			_, _ = io.WriteString(w, "root "+r.Method+" "+r.Host+" "+r.URL.RequestURI())
		}
	}))
	conns := countConns(srv)
	srv.Start()
	defer srv.Close()
	u := newUpstream(newTransport(2*time.Second), 0, 2*time.Second)
	defer u.CloseIdleConnections()

	for i := range 10 {
		if _, body := roundTrip(t, u, "GET", srv.URL+"/a?b=c"); body != "root GET "+srv.Listener.Addr().String()+" /a?b=c" {
			t.Fatalf("%d: %q", i, body)
		}
	}
	resp, body := roundTrip(t, u, "GET", srv.URL+"/chunked")
	if body != "part0;part1;part2;" || len(resp.TransferEncoding) == 0 || resp.Trailer.Get("X-Sum") != "3" {
		t.Fatalf("chunked: %q %v trailer %v", body, resp.TransferEncoding, resp.Trailer)
	}
	if resp, body := roundTrip(t, u, "GET", srv.URL+"/length"); body != "hello" || resp.ContentLength != 5 {
		t.Fatalf("content-length: %q %d", body, resp.ContentLength)
	}
	if resp, body := roundTrip(t, u, "HEAD", srv.URL+"/length"); body != "" || resp.ContentLength != 5 {
		t.Fatalf("HEAD: %q %d", body, resp.ContentLength)
	}
	if resp, body := roundTrip(t, u, "GET", srv.URL+"/204"); body != "" || resp.StatusCode != 204 {
		t.Fatalf("204: %q %d", body, resp.StatusCode)
	}
	if resp, body := roundTrip(t, u, "GET", srv.URL+"/304"); body != "" || resp.StatusCode != 304 {
		t.Fatalf("304: %q %d", body, resp.StatusCode)
	}
	if _, body := roundTrip(t, u, "GET", srv.URL+"/"); !strings.HasPrefix(body, "root GET") {
		t.Fatalf("after bodiless responses: %q", body)
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d connections for sequential requests; want 1 (keep-alive)", n)
	}

	// A body closed before its end cannot be reused: its connection is
	// closed and the next request opens another.
	req, _ := http.NewRequest("GET", srv.URL+"/chunked", nil)
	resp, err := u.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if _, body := roundTrip(t, u, "GET", srv.URL+"/"); !strings.HasPrefix(body, "root GET") {
		t.Fatalf("after an early close: %q", body)
	}
	if n := conns.Load(); n != 2 {
		t.Fatalf("%d connections; want 2", n)
	}
}

// rawServer answers each connection with handle.
func rawServer(t *testing.T, handle func(c net.Conn, br *bufio.Reader)) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c, bufio.NewReader(c))
			}()
		}
	}()
	return "http://" + ln.Addr().String()
}

// TestUpstreamIdleClosedRetried: a node agent that closes a keep-alive
// connection after one answer; the next GET on the pooled (dead)
// connection is replayed transparently on a fresh one.
func TestUpstreamIdleClosedRetried(t *testing.T) {
	var conns atomic.Int64
	url := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		n := conns.Add(1)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n%02d", n)
		// Close right after answering, as an idle timeout would.
	})
	u := newUpstream(newTransport(2*time.Second), 0, 2*time.Second)
	defer u.CloseIdleConnections()
	for i := 1; i <= 5; i++ {
		if _, body := roundTrip(t, u, "GET", url+"/"); body != fmt.Sprintf("%02d", i) {
			t.Fatalf("request %d answered by connection %q", i, body)
		}
		time.Sleep(10 * time.Millisecond) // let the close arrive
	}
	// POST is never replayed: it takes the fallback transport.
	req, _ := http.NewRequest("POST", url+"/", strings.NewReader("x"))
	if resp, err := u.RoundTrip(req); err != nil {
		t.Fatal(err)
	} else {
		resp.Body.Close()
	}
}

// TestUpstreamDiesMidBody: the client gets the headers and then a read
// error, not a hang.
func TestUpstreamDiesMidBody(t *testing.T) {
	url := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
	})
	u := newUpstream(newTransport(2*time.Second), 0, 2*time.Second)
	req, _ := http.NewRequest("GET", url+"/", nil)
	resp, err := u.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	if string(b) != "only ten b" || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("%q %v", b, err)
	}
	resp.Body.Close()

	// Through the proxy: the client sees a truncated response (or, the
	// head still being buffered, the connection closed), never a hang.
	front := proxyTo(t, url)
	creq, _ := http.NewRequest("GET", front+"/", nil)
	creq.Host = "web-abc1234-acme.zeitwork.test"
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cresp, err := http.DefaultClient.Do(creq.WithContext(ctx))
	b = nil
	if err == nil {
		b, err = io.ReadAll(cresp.Body)
		cresp.Body.Close()
	}
	if err == nil || ctx.Err() != nil || len(b) >= 100 {
		t.Fatalf("truncated body: %d bytes, %v, ctx %v", len(b), err, ctx.Err())
	}
}

// TestUpstreamCancel: a client that goes away while the app has not
// answered ends the exchange at once.
func TestUpstreamCancel(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	url := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		_, _ = http.ReadRequest(br)
		<-release
	})
	u := newUpstream(newTransport(2*time.Second), 0, 2*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", url+"/", nil)
	start := time.Now()
	if _, err := u.RoundTrip(req); !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 3*time.Second {
		t.Fatalf("%v after %s", err, time.Since(start))
	}
}

// proxyTo serves a Proxy routing web-abc1234-acme.zeitwork.test to node.
func proxyTo(t *testing.T, node string) string {
	routes := routetable.New(routetable.Options{})
	routes.Set(&routetable.Table{Version: "1", Routes: []routetable.Route{{Host: "web-abc1234-acme.zeitwork.test", Kind: "versioned", DeploymentID: "d1",
		Instances: []routetable.Instance{{ID: "i1", NodeAddress: node, Healthy: true}}}}})
	p := New(Config{AppsDomain: "zeitwork.test", ClusterToken: token, RateRPS: 1e9, RateBurst: 1e9, MaxBodyBytes: 1 << 20}, routes,
		prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	front := httptest.NewServer(p)
	t.Cleanup(front.Close)
	return front.URL
}

// TestProxyUpgradeAndStreamedBody: a 101 upgrade becomes a two-way byte
// stream, and a request body of unknown length is streamed to the app.
func TestProxyUpgradeAndStreamedBody(t *testing.T) {
	node := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "echo" {
			c, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
			_ = brw.Flush()
			line, _ := brw.ReadString('\n')
			_, _ = brw.WriteString("echo: " + line)
			_ = brw.Flush()
			return
		}
		n, err := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%s got %d bytes, chunked=%t, err=%v", r.Method, n, len(r.TransferEncoding) > 0, err)
	}))
	defer node.Close()
	front := proxyTo(t, node.URL)

	c, err := net.Dial("tcp", strings.TrimPrefix(front, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c, "GET /up HTTP/1.1\r\nHost: web-abc1234-acme.zeitwork.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	_, _ = io.WriteString(c, "hi\n")
	if line, _ := br.ReadString('\n'); line != "echo: hi\n" {
		t.Fatalf("upgraded stream: %q", line)
	}

	pr, pw := io.Pipe()
	go func() {
		for range 4 {
			_, _ = pw.Write(make([]byte, 1000))
			time.Sleep(20 * time.Millisecond)
		}
		pw.Close()
	}()
	req, _ := http.NewRequest("POST", front+"/upload", pr)
	req.Host = "web-abc1234-acme.zeitwork.test"
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "POST got 4000 bytes, chunked=true, err=<nil>" {
		t.Fatalf("streamed body: %d %q", resp.StatusCode, b)
	}
}

// TestWriteRequestMatchesRequestWrite: the hand-rolled request head says
// what r.Write says, and anything unusual is left to r.Write.
func TestWriteRequestMatchesRequestWrite(t *testing.T) {
	parse := func(b []byte) *http.Request {
		t.Helper()
		r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(string(b))))
		if err != nil {
			t.Fatalf("%q: %v", b, err)
		}
		return r
	}
	for _, tc := range []struct {
		method, url, host string
		hdr               http.Header
		lean              bool
	}{
		{"GET", "http://10.0.0.1:8081/a/b?c=d&e=%20f", "web-abc.zeitwork.test", http.Header{"User-Agent": {""}, "X-A": {"1", "2"}, "Accept": {"*/*"}}, true},
		{"HEAD", "http://10.0.0.1:8081/", "Example.COM:8443", http.Header{"User-Agent": {"curl/8"}, "Cookie": {"a=b; c=d"}}, true},
		{"OPTIONS", "http://10.0.0.1:8081/x", "[::1]:80", http.Header{}, true},
		{"TRACE", "http://10.0.0.1:8081/x", "", http.Header{"Te": {"trailers"}}, true},
		{"GET", "http://10.0.0.1:8081/", "bücher.example", http.Header{}, false},
		{"GET", "http://10.0.0.1:8081/", "a b", http.Header{}, false},
		{"GET", "http://10.0.0.1:8081/", "h", http.Header{"X-Bad": {"a\r\nb"}}, false},
		{"GET", "http://10.0.0.1:8081/", "h", http.Header{"X!Odd": {"1"}}, false},
	} {
		req, _ := http.NewRequest(tc.method, tc.url, nil)
		req.Host, req.Header = tc.host, tc.hdr
		var lean, std strings.Builder
		bw := bufio.NewWriter(&lean)
		ok := writeRequest(bw, req)
		bw.Flush()
		if ok != tc.lean || !ok && lean.Len() > 0 {
			t.Fatalf("%s %s host %q: lean=%v wrote %q", tc.method, tc.url, tc.host, ok, lean.String())
		}
		if !ok {
			continue
		}
		_ = req.Write(&std)
		a, b := parse([]byte(lean.String())), parse([]byte(std.String()))
		if a.Method != b.Method || a.RequestURI != b.RequestURI || a.Host != b.Host || a.ContentLength != b.ContentLength ||
			fmt.Sprint(a.Header) != fmt.Sprint(b.Header) {
			t.Fatalf("lean:\n%s\nr.Write:\n%s", lean.String(), std.String())
		}
	}
}

// TestUpstreamHeadLimit: an endless response head fails the request
// instead of growing without bound.
func TestUpstreamHeadLimit(t *testing.T) {
	url := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\n")
		line := "X-Filler: " + strings.Repeat("a", 1000) + "\r\n"
		for range (maxResponseHead / len(line)) + 100 {
			if _, err := io.WriteString(c, line); err != nil {
				return
			}
		}
	})
	u := newUpstream(newTransport(2*time.Second), 0, 2*time.Second)
	req, _ := http.NewRequest("GET", url+"/", nil)
	if resp, err := u.RoundTrip(req); err == nil {
		resp.Body.Close()
		t.Fatal("an oversized head was accepted")
	}
}
