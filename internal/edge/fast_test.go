package edge

import (
	"bufio"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// bigBody is /big's answer: 1 MiB that is not all the same byte.
var bigBody = func() []byte {
	b := make([]byte, 1<<20)
	for i := range b {
		b[i] = byte(i * 7 % 251)
	}
	return b
}()

// addFramingHandlers gives the fake node agent the answers whose framing
// the fast path must carry: chunked streams, long bodies, large heads,
// close-delimited bodies, informational answers, bodiless statuses.
func addFramingHandlers(mux *http.ServeMux, name string) {
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(bigBody)))
		_, _ = w.Write(bigBody)
	})
	mux.HandleFunc("/chunked", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Sum")
		for i := range 3 {
			fmt.Fprintf(w, "part%d", i)
			w.(http.Flusher).Flush()
		}
		w.Header().Set("X-Sum", "3")
	})
	mux.HandleFunc("/bighead", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Big", strings.Repeat("b", 20000))
		_, _ = io.WriteString(w, "ok")
	})
	mux.HandleFunc("/close", func(w http.ResponseWriter, r *http.Request) {
		c, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = bw.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-close")
		_ = bw.Flush()
	})
	mux.HandleFunc("/hints", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</a.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		_, _ = io.WriteString(w, "hinted")
	})
	mux.HandleFunc("/204", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case slowStarted <- struct{}{}:
		default:
		}
		d := 700 * time.Millisecond
		if ms, err := strconv.Atoi(r.URL.Query().Get("ms")); err == nil {
			d = time.Duration(ms) * time.Millisecond
		}
		time.Sleep(d)
		_, _ = io.WriteString(w, "slow done")
	})
	mux.HandleFunc("/hang", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
			select {
			case hangEnded <- name:
			default:
			}
		case <-time.After(30 * time.Second):
		}
	})
	mux.HandleFunc("/flaky", func(w http.ResponseWriter, r *http.Request) {
		if name == "node-a" {
			http.Error(w, "instance gone", http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, name)
	})
	mux.HandleFunc("/echo-headers", func(w http.ResponseWriter, r *http.Request) {
		var lines []string
		for k, vv := range r.Header {
			lines = append(lines, k+": "+strings.Join(vv, " | "))
		}
		slices.Sort(lines)
		_, _ = io.WriteString(w, strings.Join(lines, "\n")+"\n")
	})
}

// hangEnded reports /hang requests whose edge connection went away;
// slowStarted, /slow requests that reached the node.
var (
	hangEnded   = make(chan string, 16)
	slowStarted = make(chan struct{}, 16)
)

// rawConn is an HTTP/1.1 connection to the edge's HTTPS port.
type rawConn struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func (e *edgeEnv) raw(t *testing.T) *rawConn {
	c, err := tls.Dial("tcp", e.https, &tls.Config{RootCAs: e.ca, ServerName: "web-abc1234-acme.zeitwork.test", NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return &rawConn{t: t, c: c, br: bufio.NewReader(c)}
}

const appHost = "web-abc1234-acme.zeitwork.test"

func (r *rawConn) send(format string, args ...any) {
	if _, err := fmt.Fprintf(r.c, format, args...); err != nil {
		r.t.Fatal(err)
	}
}

// read reads one response to a request with method and its body.
func (r *rawConn) read(method string) (*http.Response, []byte) {
	r.t.Helper()
	resp, err := http.ReadResponse(r.br, &http.Request{Method: method})
	if err != nil {
		r.t.Fatalf("reading the response: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		r.t.Fatalf("reading the body: %v", err)
	}
	return resp, b
}

// head returns the next response's head as sent, without consuming it.
func (r *rawConn) head() string {
	r.t.Helper()
	for n := 1; ; n++ {
		b, err := r.br.Peek(n)
		if err != nil {
			r.t.Fatalf("reading a response head: %v", err)
		}
		if strings.HasSuffix(string(b), "\r\n\r\n") {
			return string(b)
		}
	}
}

func (r *rawConn) get(path string) (*http.Response, []byte) {
	r.t.Helper()
	r.send("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, appHost)
	return r.read("GET")
}

// TestFastPath drives HTTP/1.1 connections through the fast path with
// raw requests: body framings, pipelining, header rewriting, retries, the
// hand-off to net/http mid-connection, and connection close.
func TestFastPath(t *testing.T) {
	e := startEdge(t, 1000, 1000)
	fast := func() float64 {
		var m dto.Metric
		if err := e.srv.Proxy.m.fast.Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetCounter().GetValue()
	}
	r := e.raw(t)

	resp, body := r.get("/big")
	if resp.StatusCode != 200 || resp.ContentLength != 1<<20 || sha256.Sum256(body) != sha256.Sum256(bigBody) {
		t.Fatalf("/big: %d, length %d, %d bytes", resp.StatusCode, resp.ContentLength, len(body))
	}
	r.send("GET /chunked HTTP/1.1\r\nHost: %s\r\n\r\n", appHost)
	if head := r.head(); !strings.Contains(head, "\r\nTrailer: X-Sum\r\n") {
		t.Fatalf("/chunked: the Trailer announcement was not passed on:\n%s", head)
	}
	resp, body = r.read("GET")
	if string(body) != "part0part1part2" || !slices.Equal(resp.TransferEncoding, []string{"chunked"}) || resp.Trailer.Get("X-Sum") != "3" {
		t.Fatalf("/chunked: %q %v trailer %v", body, resp.TransferEncoding, resp.Trailer)
	}
	r.send("HEAD /big HTTP/1.1\r\nHost: %s\r\n\r\n", appHost)
	if resp, body = r.read("HEAD"); resp.ContentLength != 1<<20 || len(body) != 0 {
		t.Fatalf("HEAD /big: length %d, %d body bytes", resp.ContentLength, len(body))
	}
	if resp, _ = r.get("/204"); resp.StatusCode != 204 {
		t.Fatalf("/204: %d", resp.StatusCode)
	}
	r.send("GET /hints HTTP/1.1\r\nHost: %s\r\n\r\n", appHost)
	if resp, _ = r.read("GET"); resp.StatusCode != 103 || resp.Header.Get("Link") == "" {
		t.Fatalf("/hints: first answer %d %v, want 103 with Link", resp.StatusCode, resp.Header)
	}
	if resp, body = r.read("GET"); resp.StatusCode != 200 || string(body) != "hinted" {
		t.Fatalf("/hints: %d %q", resp.StatusCode, body)
	}
	if resp, body = r.get("/bighead"); len(resp.Header.Get("X-Big")) != 20000 || string(body) != "ok" {
		t.Fatalf("/bighead: %d bytes of X-Big, %q", len(resp.Header.Get("X-Big")), body)
	}

	// What the node agent sees: hop-by-hop and spoofable headers gone,
	// forwarding headers set, the client's request id kept.
	r.send("GET /echo-headers HTTP/1.1\r\nHost: %s\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"+
		"X-Zeitwork-Token: forged\r\nX-Zeitwork-Instance: i9\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Proto: gopher\r\n"+
		"Proxy-Authorization: Basic c2VjcmV0\r\n"+
		"X-Forwarded-For: 203.0.113.9\r\nx-custom: 1\r\nX-Custom: 2\r\nX-Request-Id: my-id\r\n\r\n", appHost)
	resp, body = r.read("GET")
	want := []string{"X-Custom: 1 | 2", "X-Forwarded-For: 203.0.113.9, 127.0.0.1", "X-Forwarded-Host: " + appHost,
		"X-Forwarded-Proto: https", "X-Real-Ip: 127.0.0.1", "X-Request-Id: my-id", "X-Zeitwork-Instance: i"}
	for _, w := range want {
		if !strings.Contains(string(body), w) {
			t.Errorf("the node agent did not see %q:\n%s", w, body)
		}
	}
	for _, bad := range []string{"Keep-Alive", "Te:", "6.6.6.6", "Forwarded: for", "gopher", "i9", "forged", "Proxy-Authorization"} {
		if strings.Contains(string(body), bad) {
			t.Errorf("the node agent saw %q:\n%s", bad, body)
		}
	}
	if resp.Header.Get("X-Request-Id") != "my-id" {
		t.Errorf("response X-Request-Id %q", resp.Header.Get("X-Request-Id"))
	}

	// Pipelined requests are answered in order.
	r.send("GET /flaky HTTP/1.1\r\nHost: %[1]s\r\n\r\nGET /204 HTTP/1.1\r\nHost: %[1]s\r\n\r\nGET /flaky HTTP/1.1\r\nHost: %[1]s\r\n\r\n", appHost)
	for i, want := range []int{200, 204, 200} {
		// node-a answers /flaky with 503: retried on node-b.
		if resp, body = r.read("GET"); resp.StatusCode != want || want == 200 && string(body) != "node-b" {
			t.Fatalf("pipelined answer %d: %d %q", i, resp.StatusCode, body)
		}
	}
	served := fast()
	if served != 10 {
		t.Fatalf("the fast path served %v requests", served)
	}

	// A request with a body goes to net/http, with the rest of the
	// connection; requests after it still work.
	r.send("POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n\r\nhelloGET /echo-headers HTTP/1.1\r\nHost: %s\r\n\r\n", appHost, appHost)
	if resp, body = r.read("POST"); resp.StatusCode != 200 || !strings.HasPrefix(string(body), "node-") {
		t.Fatalf("POST after the hand-off: %d %q", resp.StatusCode, body)
	}
	if resp, body = r.read("GET"); resp.StatusCode != 200 || !strings.Contains(string(body), "X-Forwarded-Proto: https") {
		t.Fatalf("GET after the hand-off: %d %q", resp.StatusCode, body)
	}
	if fast() != served {
		t.Fatalf("the fast path served requests of a connection it handed off")
	}

	// A head larger than the fast path's buffer: net/http serves it.
	r2 := e.raw(t)
	r2.send("GET /echo-headers HTTP/1.1\r\nHost: %s\r\nX-Pad: %s\r\n\r\n", appHost, strings.Repeat("p", 6000))
	if resp, body = r2.read("GET"); resp.StatusCode != 200 || !strings.Contains(string(body), strings.Repeat("p", 6000)) {
		t.Fatalf("large head: %d", resp.StatusCode)
	}
	// Malformed: net/http answers 400.
	r3 := e.raw(t)
	r3.send("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
	if resp, _ = r3.read("GET"); resp.StatusCode != 400 {
		t.Fatalf("two Host headers: %d", resp.StatusCode)
	}
	// A close-delimited answer: passed on, then the connection closes.
	r4 := e.raw(t)
	resp, body = r4.get("/close")
	if string(body) != "until-close" || !resp.Close {
		t.Fatalf("/close: %q close=%v", body, resp.Close)
	}
	if _, err := r4.br.ReadByte(); err != io.EOF {
		t.Fatalf("after a close-delimited answer: %v, want EOF", err)
	}
	// Connection: close from the client.
	r5 := e.raw(t)
	r5.send("GET /204 HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", appHost)
	if resp, _ = r5.read("GET"); !resp.Close {
		t.Fatal("Connection: close not answered with close")
	}
	if _, err := r5.br.ReadByte(); err != io.EOF {
		t.Fatalf("after Connection: close: %v, want EOF", err)
	}
	// Only a single unhealthy instance: the fast path hands over, net/http
	// answers 503.
	r6 := e.raw(t)
	r6.send("GET / HTTP/1.1\r\nHost: down-abc1234-acme.zeitwork.test\r\n\r\n")
	if resp, _ = r6.read("GET"); resp.StatusCode != 503 {
		t.Fatalf("no healthy instance: %d", resp.StatusCode)
	}
}

// TestFastPathDrain: on shutdown an idle keep-alive connection is closed
// at once and a request in progress is answered in full (with
// Connection: close) before Run returns.
func TestFastPathDrain(t *testing.T) {
	e := startEdge(t, 1000, 1000)
	idle := e.raw(t)
	if resp, _ := idle.get("/204"); resp.StatusCode != 204 {
		t.Fatal(resp.Status)
	}
	busy := e.raw(t)
	for len(slowStarted) > 0 {
		<-slowStarted
	}
	busy.send("GET /slow HTTP/1.1\r\nHost: %s\r\n\r\n", appHost)
	select { // the request is in progress
	case <-slowStarted:
	case <-time.After(10 * time.Second):
		t.Fatal("/slow never reached the node")
	}
	stopped := make(chan error, 1)
	go func() { stopped <- e.stop() }()
	if _, err := idle.br.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection on shutdown: %v, want EOF", err)
	}
	resp, body := busy.read("GET")
	if string(body) != "slow done" || !resp.Close {
		t.Fatalf("request in progress: %q close=%v", body, resp.Close)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the drain")
	}
	if c, err := net.DialTimeout("tcp", e.https, time.Second); err == nil {
		c.Close()
		t.Fatal("still accepting after shutdown")
	}
}

// TestFastPathClientGone: a client that goes away while its request
// waits for the app frees the upstream connection (the app's request is
// canceled) instead of leaving it waiting for the app's answer.
func TestFastPathClientGone(t *testing.T) {
	e := startEdge(t, 1000, 1000)
	r := e.raw(t)
	r.send("GET /hang HTTP/1.1\r\nHost: %s\r\n\r\n", appHost)
	time.Sleep(watchAfter + 300*time.Millisecond)
	r.c.Close()
	select {
	case <-hangEnded:
	case <-time.After(5 * time.Second):
		t.Fatal("the app's request was still waiting 5 s after its client went away")
	}
	// A pipelined request during a long exchange: the client is there;
	// both are answered.
	r2 := e.raw(t)
	r2.send("GET /slow?ms=1800 HTTP/1.1\r\nHost: %s\r\n\r\n", appHost)
	time.Sleep(watchAfter + 300*time.Millisecond) // the watch runs
	r2.send("GET /204 HTTP/1.1\r\nHost: %s\r\n\r\n", appHost)
	if resp, body := r2.read("GET"); string(body) != "slow done" {
		t.Fatalf("slow: %d %q", resp.StatusCode, body)
	}
	if resp, _ := r2.read("GET"); resp.StatusCode != 204 {
		t.Fatalf("pipelined after slow: %d", resp.StatusCode)
	}
}

// TestPruneState: per-instance state is kept for instances in the route
// table and forgotten for the rest.
func TestPruneState(t *testing.T) {
	routes := routetable.New(routetable.Options{})
	routes.Set(&routetable.Table{Version: "1", Routes: []routetable.Route{{Host: appHost, Kind: "versioned", DeploymentID: "d1",
		Instances: []routetable.Instance{{ID: "i1", NodeAddress: "http://127.0.0.1:1", Healthy: true}}}}})
	p := New(Config{ClusterToken: token}, routes, nil, slog.New(slog.DiscardHandler))
	kept := p.stateOf("i1")
	kept.failures.Store(2)
	p.stateOf("gone-1")
	p.stateOf("gone-2")
	if n := p.PruneState(); n != 2 {
		t.Fatalf("pruned %d, want 2", n)
	}
	if p.stateOf("i1") != kept || kept.failures.Load() != 2 {
		t.Fatal("a live instance's state was dropped")
	}
	if _, ok := p.state.Load("gone-1"); ok {
		t.Fatal("a removed instance's state is still there")
	}
}
