package edge

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// cuttable relays TCP connections to a backend until Cut, which plays the
// loss of the backend's region: connections in progress go silent (the
// edge's bytes are taken, nothing comes back) and new ones hang in the
// handshake (the listening socket's accept queue is full and the kernel
// drops SYNs), as across a link that is down.
type cuttable struct {
	ln      *net.TCPListener
	backend string
	mu      sync.Mutex
	cut     bool
	up      []net.Conn // connections to the backend, closed at the cut
	held    []net.Conn // the edge's side, kept open and silent
}

func newCuttable(t *testing.T, backend string) *cuttable {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cuttable{ln: ln.(*net.TCPListener), backend: backend}
	go c.accept()
	t.Cleanup(func() {
		c.ln.Close()
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, x := range append(c.up, c.held...) {
			x.Close()
		}
	})
	return c
}

func (c *cuttable) Addr() string { return c.ln.Addr().String() }

func (c *cuttable) accept() {
	for {
		in, err := c.ln.Accept()
		if err != nil {
			return
		}
		c.mu.Lock()
		c.held = append(c.held, in)
		if c.cut {
			c.mu.Unlock()
			return // accept no more: the queue fills
		}
		out, err := net.Dial("tcp", c.backend)
		if err != nil {
			c.mu.Unlock()
			in.Close()
			continue
		}
		c.up = append(c.up, out)
		c.mu.Unlock()
		go func() { _, _ = io.Copy(out, in) }()
		go func() { _, _ = io.Copy(in, out) }() // in is never closed here: silence, not a reset
	}
}

// Cut loses the backend; see cuttable.
func (c *cuttable) Cut(t *testing.T) {
	c.mu.Lock()
	c.cut = true
	for _, x := range c.up {
		x.Close()
	}
	c.mu.Unlock()
	raw, err := c.ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	_ = raw.Control(func(fd uintptr) { err = syscall.Listen(int(fd), 0) })
	if err != nil {
		t.Fatal(err)
	}
	// Fill the accept queue (the accept loop takes one more and stops).
	for range 4 {
		x, err := net.DialTimeout("tcp", c.Addr(), 100*time.Millisecond)
		if err != nil {
			return
		}
		c.mu.Lock()
		c.held = append(c.held, x)
		c.mu.Unlock()
	}
	t.Fatal("the cut address still accepts connections")
}

// regionOperator serves the route table as an operator does, with
// heartbeats while a long poll waits.
func regionOperator(t *testing.T, table *atomic.Pointer[routetable.Table]) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		wait, _ := time.ParseDuration(q.Get("wait"))
		hb, _ := time.ParseDuration(q.Get("heartbeat"))
		w.Header().Set("Zeitwork-Heartbeat", hb.String())
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		deadline, last := time.Now().Add(wait), time.Now()
		for table.Load().Version == q.Get("version") && time.Now().Before(deadline) {
			if time.Since(last) >= hb {
				if _, err := w.Write([]byte(" ")); err != nil {
					return
				}
				w.(http.Flusher).Flush()
				last = time.Now()
			}
			select {
			case <-r.Context().Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
		_ = json.NewEncoder(w).Encode(table.Load())
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestRegionLossUnderLoad loses a region — its nodes and the operator
// the edge long-polls — while clients send a steady load through every
// path of an edge in a third region whose app runs only in the two
// others: no request fails, and the route table without the lost region
// arrives within the silence timeout of the lost operator.
func TestRegionLossUnderLoad(t *testing.T) {
	const host = "spread-abc1234-acme.zeitwork.test"
	type node struct {
		srv    *httptest.Server
		relay  *cuttable
		served atomic.Int64
	}
	nodes := map[string]*node{}
	var insts []routetable.Instance
	for _, name := range []string{"b1", "b2", "c1", "c2"} {
		n := &node{}
		n.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("X-Zeitwork-Token") != token {
				http.Error(w, "bad token", http.StatusUnauthorized)
				return
			}
			n.served.Add(1)
			fmt.Fprintf(w, "hello from %s", name)
		}))
		t.Cleanup(n.srv.Close)
		n.relay = newCuttable(t, n.srv.Listener.Addr().String())
		nodes[name] = n
		insts = append(insts, routetable.Instance{ID: "i-" + name, NodeID: name, NodeAddress: "http://" + n.relay.Addr(), Region: name[:1], Healthy: true})
	}
	var table atomic.Pointer[routetable.Table]
	routesFor := func(version string, insts []routetable.Instance) *routetable.Table {
		return &routetable.Table{Version: version, Routes: []routetable.Route{
			{Host: host, Kind: "production", DeploymentID: "d", Instances: insts},
			{Host: "web-abc1234-acme.zeitwork.test", Kind: "versioned", DeploymentID: "d", Instances: insts},
		}}
	}
	table.Store(routesFor("1", insts))
	opC := regionOperator(t, &table)
	opCRelay := newCuttable(t, opC.Listener.Addr().String())
	opB := regionOperator(t, &table)
	opURL := func(addr string) *url.URL { u, _ := url.Parse("http://" + addr); return u }

	const silence = time.Second
	e := startEdge(t, 1e6, 1e6, func(s *Server) {
		s.Proxy.cfg.Region = "a"
		s.Proxy.up.tryTimeout = 500 * time.Millisecond
		s.Proxy.up.connectTimeout = 300 * time.Millisecond
		s.Proxy.up.fallback.DialContext = polledDial(&net.Dialer{Timeout: 300 * time.Millisecond})
		s.Routes.Operators = []*url.URL{opURL(opCRelay.Addr()), opURL(opB.Listener.Addr().String())}
		s.Routes.Silence = silence
		s.Routes.Wait = 30 * time.Second
	})

	// The load: each path, a request every 10 ms per client, a 10 s
	// client timeout; the requests in flight when the load stops are
	// waited for and counted.
	var total, failed atomic.Int64
	var fmu sync.Mutex
	var failures []string
	ctx, stop := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	h1, h2 := e.clientProto("", false), e.clientProto("", true)
	h1.Timeout, h2.Timeout = 10*time.Second, 10*time.Second
	paths := map[string]func() (int, string, error){
		"net/http": func() (int, string, error) {
			rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			rec := httptest.NewRecorder()
			req := httptest.NewRequestWithContext(rctx, "GET", "http://"+host+"/", nil)
			e.srv.Proxy.ServeHTTP(rec, req)
			return rec.Code, rec.Body.String(), nil
		},
		"http1": func() (int, string, error) { return getErr(h1, "https://"+host+"/") },
		"h2":    func() (int, string, error) { return getErr(h2, "https://"+host+"/") },
	}
	for name, get := range paths {
		for range 3 {
			wg.Go(func() {
				tick := time.NewTicker(10 * time.Millisecond)
				defer tick.Stop()
				for {
					select {
					case <-ctx.Done():
						return
					case <-tick.C:
					}
					start := time.Now()
					code, body, err := get() // a request in flight at the stop is waited for
					total.Add(1)
					if err != nil || code != 200 {
						failed.Add(1)
						fmu.Lock()
						failures = append(failures, fmt.Sprintf("%s at +%s: %d %q %v", name, start.Format("05.000"), code, body, err))
						fmu.Unlock()
					}
				}
			})
		}
	}
	time.Sleep(time.Second)
	if nodes["c1"].served.Load() == 0 || nodes["c2"].served.Load() == 0 {
		t.Fatalf("the region to lose served no request before the cut: c1 %d, c2 %d", nodes["c1"].served.Load(), nodes["c2"].served.Load())
	}
	cutAt := time.Now()
	for _, name := range []string{"c1", "c2"} {
		nodes[name].relay.Cut(t)
	}
	opCRelay.Cut(t)
	// Later the operators drop the lost region from the route table (in
	// production once its nodes miss their heartbeats).
	time.Sleep(2 * time.Second)
	table.Store(routesFor("2", insts[:2]))
	changed := time.Now()
	for e.srv.Routes.Table().Version != "2" {
		if time.Since(changed) > silence+3*time.Second {
			t.Fatalf("the edge still has route table %s %s after the change (its operator was lost %s before; silence %s)",
				e.srv.Routes.Table().Version, time.Since(changed).Round(time.Millisecond), changed.Sub(cutAt).Round(time.Millisecond), silence)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("the new route table arrived %s after the change", time.Since(changed).Round(time.Millisecond))
	time.Sleep(time.Second)
	stop()
	wg.Wait()
	t.Logf("%d requests, %d failed; served by b1 %d, b2 %d, c1 %d, c2 %d", total.Load(), failed.Load(),
		nodes["b1"].served.Load(), nodes["b2"].served.Load(), nodes["c1"].served.Load(), nodes["c2"].served.Load())
	if failed.Load() != 0 || total.Load() < 100 {
		t.Errorf("%d of %d requests failed while a region was lost:", failed.Load(), total.Load())
		for _, f := range failures {
			t.Log("  ", f)
		}
	}
}
