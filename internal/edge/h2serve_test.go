package edge

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestH2FastPath drives the HTTP/2 fast path through the framings a node
// agent answers with, and the streams that take Proxy.ServeHTTP instead
// (request bodies with trailers).
func TestH2FastPath(t *testing.T) {
	e := startEdge(t, 0, 0)
	c := e.clientProto("", true)
	do := func(req *http.Request) (*http.Response, []byte) {
		t.Helper()
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if resp.ProtoMajor != 2 {
			t.Fatalf("%s over %s", req.URL.Path, resp.Proto)
		}
		return resp, b
	}
	req := func(method, path string, body io.Reader) *http.Request {
		r, _ := http.NewRequest(method, "https://web-abc1234-acme.zeitwork.test"+path, body)
		return r
	}
	fastBefore := counterValue(t, e, "zeitwork_edge_proxy_h2_fast_path_requests_total")

	resp, b := do(req("GET", "/big", nil))
	if resp.StatusCode != 200 || !bytes.Equal(b, bigBody) || resp.ContentLength != int64(len(bigBody)) {
		t.Fatalf("/big: %d, %d bytes (length %d)", resp.StatusCode, len(b), resp.ContentLength)
	}
	resp, b = do(req("GET", "/chunked", nil))
	if string(b) != "part0part1part2" || resp.Trailer.Get("X-Sum") != "3" {
		t.Fatalf("/chunked: %q trailer %v", b, resp.Trailer)
	}
	var hints []int
	r := req("GET", "/hints", nil)
	r = r.WithContext(httptrace.WithClientTrace(r.Context(), &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
		hints = append(hints, code)
		return nil
	}}))
	if _, b = do(r); string(b) != "hinted" || len(hints) != 1 || hints[0] != 103 {
		t.Fatalf("/hints: %q, 1xx %v", b, hints)
	}
	if resp, b = do(req("GET", "/close", nil)); resp.StatusCode != 200 || string(b) != "until-close" {
		t.Fatalf("/close: %d %q", resp.StatusCode, b)
	}
	if resp, b = do(req("GET", "/204", nil)); resp.StatusCode != 204 || len(b) != 0 {
		t.Fatalf("/204: %d %q", resp.StatusCode, b)
	}
	if resp, b = do(req("HEAD", "/big", nil)); resp.StatusCode != 200 || len(b) != 0 || resp.Header.Get("Content-Length") != "1048576" {
		t.Fatalf("HEAD /big: %d %q %v", resp.StatusCode, b, resp.Header)
	}
	r = req("GET", "/echo-headers", nil)
	r.Header.Add("Cookie", "a=1")
	r.AddCookie(&http.Cookie{Name: "b", Value: "2"})
	r.Header.Set("X-Zeitwork-Instance", "forged")
	r.Header.Set("X-Forwarded-For", "203.0.113.9")
	r.Header.Set("Forwarded", "for=203.0.113.9")
	resp, b = do(r)
	got := string(b)
	for _, want := range []string{"Cookie: a=1; b=2\n", "X-Forwarded-For: 203.0.113.9, 127.0.0.1\n", "X-Forwarded-Proto: https\n",
		"X-Zeitwork-Instance: i", "X-Real-Ip: 127.0.0.1\n", "X-Forwarded-Host: web-abc1234-acme.zeitwork.test\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("/echo-headers lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "forged") || strings.Contains(got, "Forwarded: for") || resp.Header.Get("X-Request-Id") == "" {
		t.Errorf("/echo-headers passed a client's internal header or lost the request id:\n%s\n%v", got, resp.Header)
	}
	fastAfter := counterValue(t, e, "zeitwork_edge_proxy_h2_fast_path_requests_total")
	if fastAfter-fastBefore != 7 {
		t.Errorf("h2 fast path served %v requests, want 7", fastAfter-fastBefore)
	}
	// A body (larger than the stream window, with trailers) goes through
	// ServeHTTP and the reverse proxy; the answer's trailers come back.
	// (Request trailers reach the edge but, as before, not the node:
	// ReverseProxy copies the request before they arrive.)
	body := strings.Repeat("0123456789", 50_000)
	r = req("POST", "/echo-body", nil)
	r.Trailer = http.Header{"X-Checksum": nil}
	r.ContentLength = -1
	r.Body = &trailerBody{r: strings.NewReader(body), req: r}
	resp, b = do(r)
	if _, declared := resp.Trailer["X-Got-Trailer"]; string(b) != body || !declared {
		t.Fatalf("POST /echo-body: %d bytes back (sent %d), trailer %v", len(b), len(body), resp.Trailer)
	}
	if counterValue(t, e, "zeitwork_edge_proxy_h2_fast_path_requests_total") != fastAfter {
		t.Error("a request with a body took the fast path")
	}
}

// trailerBody sets the request's trailer once its body is read.
type trailerBody struct {
	r   io.Reader
	req *http.Request
}

func (b *trailerBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err == io.EOF {
		b.req.Trailer.Set("X-Checksum", "sum-1")
	}
	return n, err
}

func (b *trailerBody) Close() error { return nil }

func counterValue(t *testing.T, e *edgeEnv, name string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			var sum float64
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
			return sum
		}
	}
	return 0
}

// TestH2Drain: when the edge stops, an h2 connection gets GOAWAY, its
// open stream still completes, and then the connection closes.
func TestH2Drain(t *testing.T) {
	e := startEdge(t, 0, 0)
	r := dialH2Raw(t, e)
	if err := r.get(1, "/slow?ms=500"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the stream is open
	stopped := make(chan error, 1)
	go func() { stopped <- e.stop() }()
	var ended bool
	seen := r.readAll(10*time.Second, func(f http2.Frame) bool {
		if d, ok := f.(*http2.DataFrame); ok && d.StreamID == 1 && d.StreamEnded() {
			ended = true
		}
		return false // read until the edge closes the connection
	})
	if !seen.gotAway || seen.goAway != http2.ErrCodeNo || seen.statuses["200"] != 1 || !ended {
		t.Fatalf("drain: %+v (%v), stream ended %v", seen, seen.err, ended)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the edge did not stop")
	}
}
