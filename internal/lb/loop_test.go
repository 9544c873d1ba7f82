package lb

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/proxyproto"
)

// blackhole returns a loopback address whose SYNs are dropped: a socket
// listening with a backlog of 0 whose one queue slot is taken, so a connect
// to it neither completes nor fails.
func blackhole(t *testing.T) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(sa.(*unix.SockaddrInet4).Port)
	filler, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { filler.Close() })
	if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("second connect to the full listener succeeded; cannot build a black hole")
	}
	return addr
}

// TestConnectTimeoutTriesNextBackend: a backend whose connect never
// completes is given up after ConnectTimeout and the client is relayed to
// another backend.
func TestConnectTimeoutTriesNextBackend(t *testing.T) {
	hole := blackhole(t)
	good := startBackend(t, "good", "127.0.0.1:0")
	l := startLB(t, Config{ConnectTimeout: 200 * time.Millisecond, Health: HealthConfig{Interval: time.Hour, Timeout: 100 * time.Millisecond, Fall: 100, EjectAfter: 100}}, hole, good.addr)
	addr := l.Addrs()[0].String()
	for i := range 6 {
		start := time.Now()
		g, err := greet(addr, "")
		if err != nil || !strings.HasPrefix(g, "good ") {
			t.Fatalf("client %d: %q %v", i, g, err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("client %d waited %v", i, d)
		}
	}
	for _, st := range l.Status() {
		if st.Addr == hole && (st.ConnectFailures == 0 || !strings.Contains(st.LastError, "timed out")) {
			t.Fatalf("black-holed backend: %+v", st)
		}
	}
}

// TestMaxConnsWaitsInBacklog: at the connection limit a new client is not
// accepted (it waits in the kernel's backlog) and is served as soon as an
// open connection ends.
func TestMaxConnsWaitsInBacklog(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1)) // one loop: the limit is exact
	b := startBackend(t, "a", "127.0.0.1:0")
	l := startLB(t, Config{MaxConns: 1}, b.addr)
	addr := l.Addrs()[0].String()
	first, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if _, err := bufio.NewReader(first).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	second, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	br := bufio.NewReader(second)
	_ = second.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if g, err := br.ReadString('\n'); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("second client served over the limit: %q %v", g, err)
	}
	first.Close()
	_ = second.SetReadDeadline(time.Now().Add(5 * time.Second))
	if g, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(g, "a ") {
		t.Fatalf("second client after the first closed: %q %v", g, err)
	}
}

// TestDrainTimeoutClosesConnections: connections still open when the
// drain timeout ends are closed and Run returns.
func TestDrainTimeoutClosesConnections(t *testing.T) {
	d := drainable(t, 300*time.Millisecond)
	d.cancel()
	select {
	case err := <-d.done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the drain timeout")
	}
	_ = d.c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := d.br.ReadString('\n'); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection still open after the drain timeout: %v", err)
	}
}

// TestBackendHostName: a backend given by host name is relayed to once the
// health checker has resolved it.
func TestBackendHostName(t *testing.T) {
	b := startBackend(t, "named", "127.0.0.1:0")
	_, port, _ := net.SplitHostPort(b.addr)
	l := startLB(t, Config{}, "localhost:"+port)
	addr := l.Addrs()[0].String()
	deadline := time.Now().Add(5 * time.Second)
	for {
		g, err := greet(addr, "")
		if err == nil && strings.HasPrefix(g, "named ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("backend localhost:%s never reached: %q %v", port, g, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for range 5 {
		if g, err := greet(addr, ""); err != nil || !strings.HasPrefix(g, "named ") {
			t.Fatalf("after resolution: %q %v", g, err)
		}
	}
}

// TestFifo checks the deadline queue against a plain slice through pushes
// and pops that make it wrap, compact and empty.
func TestFifo(t *testing.T) {
	var q fifo
	var ref []int64
	next := int64(0)
	for step := range 20000 {
		if step%7 < 4 || len(ref) == 0 {
			next++
			q.push(timed{at: next})
			ref = append(ref, next)
		} else {
			got, ok := q.peek()
			if !ok || got.at != ref[0] {
				t.Fatalf("step %d: peek %v %v, want %d", step, got.at, ok, ref[0])
			}
			q.pop()
			ref = ref[1:]
		}
		if step%5000 == 4999 { // drain completely now and then
			for len(ref) > 0 {
				got, _ := q.peek()
				if got.at != ref[0] {
					t.Fatalf("drain: %d, want %d", got.at, ref[0])
				}
				q.pop()
				ref = ref[1:]
			}
			if _, ok := q.peek(); ok {
				t.Fatal("queue not empty after draining")
			}
		}
	}
	if len(q.items)-q.head != len(ref) || cap(q.items) > 4*len(ref)+4096 {
		t.Fatalf("queue holds %d items (cap %d) for %d", len(q.items)-q.head, cap(q.items), len(ref))
	}
}

// TestWildcardListenerHeader: on a wildcard (dual-stack) listener the
// PROXY header carries the address each client actually connected to, as
// IPv4 for IPv4 clients and IPv6 for IPv6 ones.
func TestWildcardListenerHeader(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	trusted, _ := proxyproto.ParseTrusted([]string{"127.0.0.0/8", "::1/128"})
	ln := proxyproto.NewListener(inner, proxyproto.ListenerConfig{Trusted: trusted})
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				h := c.(*proxyproto.Conn).Header()
				if h == nil {
					_, _ = io.WriteString(c, "no header\n")
					return
				}
				_, _ = io.WriteString(c, h.Source.String()+" "+h.Destination.String()+"\n")
			}()
		}
	}()
	l := startLB(t, Config{Listeners: []Listener{{Addr: ":0", TargetPort: 1}}}, inner.Addr().String())
	_, port, _ := net.SplitHostPort(l.Addrs()[0].String())
	clients := []string{"127.0.0.1"}
	if c, err := net.Listen("tcp6", "[::1]:0"); err == nil {
		c.Close()
		clients = append(clients, "::1")
	}
	for _, ip := range clients {
		g, err := greet(net.JoinHostPort(ip, port), "")
		if err != nil {
			t.Fatal(err)
		}
		src, dst, _ := strings.Cut(g, " ")
		if host, _, _ := net.SplitHostPort(src); host != ip || dst != net.JoinHostPort(ip, port) {
			t.Fatalf("client via %s: header %q", ip, g)
		}
	}
}
