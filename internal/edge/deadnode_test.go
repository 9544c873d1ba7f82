package edge

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// lostNode plays the node agent of a node that is lost after the edge
// sent it a request: it takes the connection and the request and never
// answers, and from then on refuses new connections (as a lost node's
// address does: unreachable, or no answer to a SYN).
type lostNode struct {
	URL  string
	got  atomic.Int64 // requests received
	ln   net.Listener
	held chan net.Conn
}

func newLostNode(t *testing.T) *lostNode {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &lostNode{URL: "http://" + ln.Addr().String(), ln: ln, held: make(chan net.Conn, 16)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.held <- c
			go func() {
				buf := make([]byte, 4096)
				if k, _ := c.Read(buf); k > 0 && strings.Contains(string(buf[:k]), "\r\n\r\n") {
					n.got.Add(1)
					ln.Close() // lost: no new connections
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		for {
			select {
			case c := <-n.held:
				c.Close()
			default:
				return
			}
		}
	})
	return n
}

// blackholed returns a loopback address whose connects hang: a listening
// socket with a full accept queue (backlog 0, one connection in it) drops
// new SYNs, as a lost node's address does.
func blackholed(t *testing.T) string {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	addr := (&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: sa.(*syscall.SockaddrInet4).Port}).String()
	for range 3 { // fill the queue; further connects hang
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
	}
	if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("cannot make a blackholed address here (the accept queue does not fill)")
	}
	return addr
}

// slowNode answers every request after delay, saying which node it is.
func slowNode(t *testing.T, name string, delay time.Duration) (*httptest.Server, *atomic.Int64) {
	var got atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got.Add(1)
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, name)
	}))
	t.Cleanup(srv.Close)
	return srv, &got
}

// serveOnce sends one GET through ServeHTTP (the net/http path).
func serveOnce(p *Proxy, host string) (int, string, time.Duration) {
	start := time.Now()
	rec := httptest.NewRecorder()
	p.ServeHTTP(rec, httptest.NewRequest("GET", "http://"+host+"/", nil))
	return rec.Code, rec.Body.String(), time.Since(start)
}

func tableWith(host string, insts ...routetable.Instance) *routetable.Table {
	return &routetable.Table{Version: host + time.Now().String(), Routes: []routetable.Route{{Host: host, Kind: "versioned", DeploymentID: "d", Instances: insts}}}
}

// TestLostNodeRetried: a try that gets no answer within the try timeout,
// from a node agent that no longer accepts connections, is retried on
// another instance — on each path that proxies.
func TestLostNodeRetried(t *testing.T) {
	const host = "lost-abc1234-acme.zeitwork.test"
	e := startEdge(t, 1000, 1000, func(s *Server) {
		s.Proxy.cfg.Region = "here"
		s.Proxy.up.tryTimeout = 300 * time.Millisecond
	})
	live := fakeNode(t, "node-live")
	paths := []struct {
		name string
		get  func() (int, string, error)
	}{
		{"net/http", func() (int, string, error) { code, body, _ := serveOnce(e.srv.Proxy, host); return code, body, nil }},
		{"http1 fast path", func() (int, string, error) { return getErr(e.clientProto("", false), "https://"+host+"/") }},
		{"h2 fast path", func() (int, string, error) { return getErr(e.clientProto("", true), "https://"+host+"/") }},
	}
	for i, path := range paths {
		t.Run(path.name, func(t *testing.T) {
			lost := newLostNode(t)
			// The lost node is in the edge's region: it is tried first.
			e.op.table.Store(tableWith(host,
				routetable.Instance{ID: "lost" + string(rune('a'+i)), NodeAddress: lost.URL, Region: "here", Healthy: true},
				routetable.Instance{ID: "live", NodeAddress: live.URL, Region: "there", Healthy: true}))
			waitRoute(t, e, host, 2)
			start := time.Now()
			code, body, err := path.get()
			took := time.Since(start)
			if err != nil || code != 200 || !strings.HasPrefix(body, "node-live") {
				t.Fatalf("%d %q %v after %s", code, body, err, took)
			}
			if lost.got.Load() != 1 {
				t.Fatalf("the lost node got %d requests, want 1 (tried first)", lost.got.Load())
			}
			if took > 3*time.Second {
				t.Errorf("the retry came after %s (try timeout 300ms, connect timeout 2s)", took)
			}
		})
	}
}

// TestSlowAppNotRetried: an app slower than the try timeout on a node
// that is there is waited for (a long poll), not retried.
func TestSlowAppNotRetried(t *testing.T) {
	const host = "slow-abc1234-acme.zeitwork.test"
	e := startEdge(t, 1000, 1000, func(s *Server) {
		s.Proxy.cfg.Region = "here"
		s.Proxy.up.tryTimeout = 100 * time.Millisecond
	})
	slow, got := slowNode(t, "node-slow", 700*time.Millisecond)
	other := fakeNode(t, "node-other")
	e.op.table.Store(tableWith(host,
		routetable.Instance{ID: "slow", NodeAddress: slow.URL, Region: "here", Healthy: true},
		routetable.Instance{ID: "other", NodeAddress: other.URL, Region: "there", Healthy: true}))
	waitRoute(t, e, host, 2)
	for _, path := range []struct {
		name string
		get  func() (int, string, error)
	}{
		{"net/http", func() (int, string, error) { code, body, _ := serveOnce(e.srv.Proxy, host); return code, body, nil }},
		{"http1 fast path", func() (int, string, error) { return getErr(e.clientProto("", false), "https://"+host+"/") }},
		{"h2 fast path", func() (int, string, error) { return getErr(e.clientProto("", true), "https://"+host+"/") }},
	} {
		before := got.Load()
		code, body, err := path.get()
		if err != nil || code != 200 || body != "node-slow" || got.Load() != before+1 {
			t.Errorf("%s: %d %q %v; the slow node got %d requests, want 1", path.name, code, body, err, got.Load()-before)
		}
	}
}

// TestConnectTimeout: a dial to a node whose address does not answer
// gives up after the connect timeout and tries another instance.
func TestConnectTimeout(t *testing.T) {
	const host = "hole-abc1234-acme.zeitwork.test"
	hole := blackholed(t)
	live := fakeNode(t, "node-live")
	routes := routetable.New(routetable.Options{})
	routes.Set(tableWith(host,
		routetable.Instance{ID: "hole", NodeAddress: "http://" + hole, Region: "here", Healthy: true},
		routetable.Instance{ID: "live", NodeAddress: live.URL, Region: "there", Healthy: true}))
	p := New(Config{ClusterToken: token, Region: "here", ConnectTimeout: 300 * time.Millisecond, TryTimeout: 300 * time.Millisecond},
		routes, nil, slog.New(slog.DiscardHandler))
	code, body, took := serveOnce(p, host)
	if code != 200 || !strings.HasPrefix(body, "node-live") || took > 2*time.Second {
		t.Fatalf("%d %q after %s (connect timeout 300ms)", code, body, took)
	}
}

// TestRetriesBounded: a request is tried on at most 1+maxRetries
// instances, then answered 502.
func TestRetriesBounded(t *testing.T) {
	const host = "many-abc1234-acme.zeitwork.test"
	var insts []routetable.Instance
	var nodes []*lostNode
	for i := range 5 {
		n := newLostNode(t)
		nodes = append(nodes, n)
		insts = append(insts, routetable.Instance{ID: "lost" + string(rune('a'+i)), NodeAddress: n.URL, Region: "here", Healthy: true})
	}
	routes := routetable.New(routetable.Options{})
	routes.Set(tableWith(host, insts...))
	p := New(Config{ClusterToken: token, Region: "here", TryTimeout: 100 * time.Millisecond}, routes, nil, slog.New(slog.DiscardHandler))
	code, body, _ := serveOnce(p, host)
	tried := 0
	for _, n := range nodes {
		tried += int(n.got.Load())
	}
	if code != 502 || !strings.Contains(body, "did not answer") || tried != 1+maxRetries {
		t.Fatalf("%d %q; %d instances tried, want %d", code, body, tried, 1+maxRetries)
	}
}

func getErr(c *http.Client, url string) (int, string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func waitRoute(t *testing.T, e *edgeEnv, host string, instances int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if r := e.srv.Routes.Table().Lookup(host); r != nil && len(r.Instances) == instances && r.Instances[0].NodeAddress == e.op.table.Load().Routes[0].Instances[0].NodeAddress {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("route for %s never synced", host)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
