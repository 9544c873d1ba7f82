package lb

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/proxyproto"
)

// backend is a test edge proxy: it accepts PROXY headers from loopback,
// greets with "<name> <client addr>\n", then echoes until EOF and closes.
type backend struct {
	name  string
	ln    net.Listener
	addr  string
	conns atomic.Int64
	wg    sync.WaitGroup
}

func startBackend(t *testing.T, name, addr string) *backend {
	t.Helper()
	inner, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	trusted, _ := proxyproto.ParseTrusted([]string{"127.0.0.0/8"})
	b := &backend{name: name, addr: inner.Addr().String(), ln: proxyproto.NewListener(inner, proxyproto.ListenerConfig{Trusted: trusted})}
	b.wg.Go(func() {
		for {
			c, err := b.ln.Accept()
			if err != nil {
				return
			}
			b.conns.Add(1)
			b.wg.Go(func() {
				defer c.Close()
				if _, err := fmt.Fprintf(c, "%s %s\n", b.name, c.RemoteAddr()); err != nil {
					return
				}
				_, _ = io.Copy(c, c)
			})
		}
	})
	t.Cleanup(b.stop)
	return b
}

func (b *backend) stop() { b.ln.Close() }

func startLB(t *testing.T, cfg Config, backends ...string) *LB {
	t.Helper()
	return runLB(t, cfg, nil, backends...)
}

// runLB runs a balancer (on a loopback port unless cfg names listeners)
// until the test ends; the test fails if Run returns an error.
func runLB(t *testing.T, cfg Config, reg prometheus.Registerer, backends ...string) *LB {
	t.Helper()
	if cfg.Listeners == nil {
		cfg.Listeners = []Listener{{Addr: "127.0.0.1:0", TargetPort: 1}}
	}
	if cfg.Algorithm == "" {
		cfg.Algorithm = RoundRobin
	}
	if cfg.ProxyProtocol == "" {
		cfg.ProxyProtocol = "v2"
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 5 * time.Second
	}
	l, err := New(cfg, reg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	l.SetBackends(backends)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return l
}

// greet connects through the balancer and returns the backend's greeting.
func greet(addr string, from string) (string, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func TestProxyV2CarriesClientAddress(t *testing.T) {
	b := startBackend(t, "edge-a", "127.0.0.1:0")
	l := startLB(t, Config{}, b.addr)
	got, err := greet(l.Addrs()[0].String(), "127.0.0.77")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(got, "edge-a 127.0.0.77:") {
		t.Fatalf("backend saw %q; want the client's address 127.0.0.77", got)
	}
}

// TestHealthFallAndRise kills a backend while clients keep connecting: no
// client fails while another backend is healthy; the dead one stops getting
// connections and comes back after it recovers.
func TestHealthFallAndRise(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	bb := startBackend(t, "b", "127.0.0.1:0")
	l := startLB(t, Config{Health: HealthConfig{Interval: 50 * time.Millisecond, Rise: 2, Fall: 2}}, a.addr, bb.addr)
	addr := l.Addrs()[0].String()
	seen := map[string]int{}
	for range 20 {
		g, err := greet(addr, "")
		if err != nil {
			t.Fatal(err)
		}
		seen[strings.Fields(g)[0]]++
	}
	if seen["a"] == 0 || seen["b"] == 0 {
		t.Fatalf("both backends should serve: %v", seen)
	}
	a.stop()
	deadline := time.Now().Add(30 * time.Second)
	for l.Pools()[0].Healthy() != 1 {
		if time.Now().After(deadline) {
			t.Fatal("dead backend never marked down")
		}
		if g, err := greet(addr, ""); err != nil || !strings.HasPrefix(g, "b ") {
			t.Fatalf("client saw %q, %v while backend b was healthy", g, err)
		}
	}
	for range 50 {
		if g, err := greet(addr, ""); err != nil || !strings.HasPrefix(g, "b ") {
			t.Fatalf("client saw %q, %v after a was marked down", g, err)
		}
	}
	startBackend(t, "a2", a.addr) // recover on the same address
	deadline = time.Now().Add(30 * time.Second)
	for l.Pools()[0].Healthy() != 2 {
		if time.Now().After(deadline) {
			t.Fatal("recovered backend never marked up")
		}
		time.Sleep(20 * time.Millisecond)
	}
	seen = map[string]int{}
	for range 20 {
		g, err := greet(addr, "")
		if err != nil {
			t.Fatal(err)
		}
		seen[strings.Fields(g)[0]]++
	}
	if seen["a2"] == 0 {
		t.Fatalf("recovered backend gets no connections: %v", seen)
	}
}

// TestHalfCloseAndLargeTransfer sends 64 MiB, half-closes, and checks the
// echoed bytes' checksum and that the backend saw EOF and answered fully.
func TestHalfCloseAndLargeTransfer(t *testing.T) {
	b := startBackend(t, "a", "127.0.0.1:0")
	l := startLB(t, Config{}, b.addr)
	c, err := net.Dial("tcp", l.Addrs()[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	const size = 64 << 20
	sent := sha256.New()
	go func() {
		_, _ = io.Copy(c, io.TeeReader(io.LimitReader(rand.Reader, size), sent))
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	br := bufio.NewReader(c)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	got := sha256.New()
	n, err := io.Copy(got, br) // ends only if the backend saw our EOF and closed
	if err != nil || n != size {
		t.Fatalf("echoed %d bytes, err %v; want %d", n, err, size)
	}
	if fmt.Sprintf("%x", got.Sum(nil)) != fmt.Sprintf("%x", sent.Sum(nil)) {
		t.Fatal("checksum mismatch")
	}
}

func TestThousandConcurrentConnections(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < 8192 {
		lim.Cur = min(lim.Max, 8192)
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	b1 := startBackend(t, "a", "127.0.0.1:0")
	b2 := startBackend(t, "b", "127.0.0.1:0")
	l := startLB(t, Config{Algorithm: LeastConnections}, b1.addr, b2.addr)
	const n = 1000
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	readers := make([]*bufio.Reader, 0, n)
	for range n {
		c, err := net.DialTimeout("tcp", l.Addrs()[0].String(), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		conns = append(conns, c)
		readers = append(readers, bufio.NewReader(c))
	}
	// All 1,000 are open at once; each now exchanges a message.
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i, c := range conns {
		wg.Go(func() {
			if _, err := readers[i].ReadString('\n'); err != nil {
				failed.Add(1)
				return
			}
			msg := fmt.Sprintf("ping %d\n", i)
			if _, err := io.WriteString(c, msg); err != nil {
				failed.Add(1)
				return
			}
			if got, err := readers[i].ReadString('\n'); err != nil || got != msg {
				failed.Add(1)
			}
		})
	}
	wg.Wait()
	if f := failed.Load(); f != 0 {
		t.Fatalf("%d of %d connections failed", f, n)
	}
	if a, b := b1.conns.Load(), b2.conns.Load(); a+b < n || a < 300 || b < 300 {
		t.Fatalf("backends got %d and %d connections", a, b)
	}
}

// TestNginxInterop puts Debian's nginx behind the balancer with
// `listen … proxy_protocol` and checks it sees the real client address.
func TestNginxInterop(t *testing.T) {
	nginx, err := exec.LookPath("nginx")
	if err != nil {
		nginx = "/usr/sbin/nginx"
	}
	port := freePort(t)
	dir := t.TempDir()
	conf := fmt.Sprintf(`daemon off;
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path %[1]s; proxy_temp_path %[1]s; fastcgi_temp_path %[1]s; uwsgi_temp_path %[1]s; scgi_temp_path %[1]s;
  server {
    listen 127.0.0.1:%[2]d proxy_protocol;
    location / { return 200 "client=$proxy_protocol_addr:$proxy_protocol_port peer=$remote_addr\n"; }
  }
}
`, dir, port)
	if err := os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(nginx, "-p", dir, "-c", filepath.Join(dir, "nginx.conf"))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("cannot start nginx (apt package nginx-light): %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	target := fmt.Sprintf("127.0.0.1:%d", port)
	waitListening(t, target)
	for i, version := range []string{"v2", "v1"} {
		t.Run(version, func(t *testing.T) {
			l := startLB(t, Config{ProxyProtocol: version}, target)
			client := fmt.Sprintf("127.0.0.%d", 99+i)
			hc := &http.Client{Transport: &http.Transport{DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(client)}}).DialContext}, Timeout: 10 * time.Second}
			defer hc.CloseIdleConnections()
			resp, err := hc.Get("http://" + l.Addrs()[0].String() + "/")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if !strings.HasPrefix(string(body), "client="+client+":") || !strings.Contains(string(body), "peer=127.0.0.1\n") {
				t.Fatalf("nginx saw %q; want client %s from the PROXY header", body, client)
			}
		})
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func waitListening(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// drainRun is a balancer that the test itself ends, with one client
// connection open through it (its greeting read).
type drainRun struct {
	l      *LB
	c      net.Conn
	br     *bufio.Reader
	cancel context.CancelFunc
	done   chan error // Run's result
}

func drainable(t *testing.T, timeout time.Duration) *drainRun {
	t.Helper()
	b := startBackend(t, "a", "127.0.0.1:0")
	l, err := New(Config{Listeners: []Listener{{Addr: "127.0.0.1:0", TargetPort: 1}}, Algorithm: RoundRobin, ProxyProtocol: "v2", DrainTimeout: timeout}, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	l.SetBackends([]string{b.addr})
	ctx, cancel := context.WithCancel(context.Background())
	d := &drainRun{l: l, cancel: cancel, done: make(chan error, 1)}
	go func() { d.done <- l.Run(ctx) }()
	t.Cleanup(cancel)
	if d.c, err = net.Dial("tcp", l.Addrs()[0].String()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.c.Close() })
	d.br = bufio.NewReader(d.c)
	if _, err := d.br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	return d
}

// TestDrainOnShutdown: after ctx ends the listener closes, but an open
// connection keeps working until it finishes.
func TestDrainOnShutdown(t *testing.T) {
	d := drainable(t, 20*time.Second)
	c, br := d.c, d.br
	d.cancel()
	time.Sleep(100 * time.Millisecond)
	if _, err := net.DialTimeout("tcp", d.l.Addrs()[0].String(), time.Second); err == nil {
		t.Fatal("listener still accepting after shutdown began")
	}
	if _, err := io.WriteString(c, "still here\n"); err != nil {
		t.Fatal(err)
	}
	if got, err := br.ReadString('\n'); err != nil || got != "still here\n" {
		t.Fatalf("open connection broke during drain: %q %v", got, err)
	}
	c.(*net.TCPConn).CloseWrite()
	select {
	case err := <-d.done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return after the last connection closed")
	}
}
