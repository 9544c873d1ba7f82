package edge

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

var (
	fuzzOnce sync.Once
	fuzzAddr string
)

// fuzzFront starts, once per process, a plain-HTTP front for a route to a
// fake node agent; it runs until the process ends.
func fuzzFront(f *testing.F) string {
	fuzzOnce.Do(func() {
		mux := http.NewServeMux()
		addFramingHandlers(mux, "node-a")
		mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") })
		node := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" || r.URL.Path == "/hang" { // slow on purpose: not what is fuzzed
				http.NotFound(w, r)
				return
			}
			mux.ServeHTTP(w, r)
		}))
		routes := routetable.New(routetable.Options{})
		routes.Set(&routetable.Table{Version: "1", Routes: []routetable.Route{{Host: appHost, Kind: "versioned", DeploymentID: "d1",
			Instances: []routetable.Instance{{ID: "i1", NodeAddress: node.URL, Healthy: true}}}}})
		log := slog.New(slog.DiscardHandler)
		p := New(Config{AppsDomain: "zeitwork.test", ClusterToken: token, RateRPS: 1e9, RateBurst: 1e9, MaxBodyBytes: 1 << 20}, routes, prometheus.NewRegistry(), log)
		srv := &http.Server{Handler: p, ReadHeaderTimeout: 2 * time.Second, IdleTimeout: 2 * time.Second}
		fr := newFront(p, nil, srv, func(*routetable.Route, []byte) bool { return true }, log)
		fr.readHeaderTimeout, fr.idleTimeout = 2*time.Second, 2*time.Second
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			f.Fatal(err)
		}
		fuzzAddr = ln.Addr().String()
		go func() { _ = fr.serve(context.Background(), ln, time.Second) }() // lives as long as the fuzz process
	})
	return fuzzAddr
}

// FuzzFront sends arbitrary bytes as one client's connection to a front:
// whatever the fast path serves itself and whatever it hands to net/http,
// what comes back is a sequence of well-formed HTTP/1.1 responses, and the
// connection ends once the client has finished sending.
func FuzzFront(f *testing.F) {
	addr := fuzzFront(f)
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: " + appHost + "\r\n\r\n",
		"GET /chunked HTTP/1.1\r\nHost: " + appHost + "\r\n\r\nGET /204 HTTP/1.1\r\nHost: " + appHost + "\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: " + appHost + "\r\n\r\nPOST / HTTP/1.1\r\nHost: " + appHost + "\r\nContent-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\nHost: " + appHost + "\r\n\r\n",
		"HEAD /big HTTP/1.1\r\nHost: " + appHost + "\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: nope.test\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: " + appHost + "\r\nHost: x\r\n\r\n",
		"GET /hints HTTP/1.1\r\nHost: " + appHost + "\r\nConnection: close\r\n\r\n",
		"\x00\x01garbage\r\n\r\n",
		"GET / HTTP/1.0\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(15 * time.Second))
		go func() { // ends when the write completes or fails
			_, _ = c.Write(in)
			_ = c.(*net.TCPConn).CloseWrite()
		}()
		br := bufio.NewReader(c)
		for n := 0; ; n++ {
			if _, err := br.Peek(1); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("the edge neither answered nor closed within 15 s (after %d responses)", n)
				}
				return // the edge closed the connection: fine
			}
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("response %d is not HTTP: %v", n, err)
			}
			// A response to HEAD has no body whatever its length says;
			// without the request method at hand, only bodies the
			// framing announces are read.
			if _, err := io.Copy(io.Discard, resp.Body); err != nil && resp.ContentLength != 0 {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("response %d: body stalled", n)
				}
			}
			resp.Body.Close()
		}
	})
}
