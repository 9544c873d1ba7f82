package lb

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/service"
)

func adminServer(t *testing.T, l *LB) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	l.Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func post(t *testing.T, u string) (int, string) {
	t.Helper()
	resp, err := http.Post(u, "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func backendStates(t *testing.T, base string) map[string]BackendStatus {
	t.Helper()
	resp, err := http.Get(base + "/backends")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc struct{ Backends []BackendStatus }
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatal(err)
	}
	out := map[string]BackendStatus{}
	for _, b := range doc.Backends {
		out[b.Addr] = b
	}
	return out
}

// TestAdminDrainAndEnable drains one backend through the admin API: it gets
// no new connections while an open one keeps working, and gets new ones
// again once enabled.
func TestAdminDrainAndEnable(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackend(t, "b", "127.0.0.1:0")
	l := startLB(t, Config{}, a.addr, b.addr)
	admin := adminServer(t, l)
	addr := l.Addrs()[0].String()

	// An open connection to a, held across the drain.
	var held net.Conn
	var heldReader *bufio.Reader
	for range 10 {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		br := bufio.NewReader(c)
		g, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(g, "a ") {
			held, heldReader = c, br
			break
		}
		c.Close()
	}
	if held == nil {
		t.Fatal("round-robin never picked backend a")
	}
	defer held.Close()

	if code, body := post(t, admin.URL+"/backends/"+url.PathEscape(a.addr)+"/drain"); code != 200 || !strings.Contains(body, `"draining"`) {
		t.Fatalf("drain: %d %s", code, body)
	}
	if st := backendStates(t, admin.URL)[a.addr]; st.State != "draining" || st.ActiveConnections != 1 {
		t.Fatalf("drained backend: %+v", st)
	}
	for range 20 {
		if g, err := greet(addr, ""); err != nil || !strings.HasPrefix(g, "b ") {
			t.Fatalf("new connection during drain reached %q, %v", g, err)
		}
	}
	if _, err := io.WriteString(held, "still open\n"); err != nil {
		t.Fatal(err)
	}
	if got, err := heldReader.ReadString('\n'); err != nil || got != "still open\n" {
		t.Fatalf("connection to the drained backend broke: %q %v", got, err)
	}

	if code, body := post(t, admin.URL+"/backends/"+url.PathEscape(a.addr)+"/enable"); code != 200 {
		t.Fatalf("enable: %d %s", code, body)
	}
	seen := map[string]int{}
	for range 10 {
		g, err := greet(addr, "")
		if err != nil {
			t.Fatal(err)
		}
		seen[strings.Fields(g)[0]]++
	}
	if seen["a"] == 0 {
		t.Fatalf("enabled backend gets no connections: %v", seen)
	}
	code, body := post(t, admin.URL+"/backends/192.0.2.1:443/drain")
	if code != 404 || !strings.Contains(body, `"code":"not_found"`) {
		t.Fatalf("unknown backend: %d %s", code, body)
	}
}

// TestPassiveEjectionAndRetry: a backend that refuses connections is
// retried on another one, so no client fails, and is taken out after
// EjectAfter failures without waiting for the (here hourly) health check.
func TestPassiveEjectionAndRetry(t *testing.T) {
	good := startBackend(t, "good", "127.0.0.1:0")
	dead := startBackend(t, "dead", "127.0.0.1:0")
	dead.stop()
	cfg := Config{Listeners: []Listener{{Addr: "127.0.0.1:0", TargetPort: 1}}, Algorithm: RoundRobin, ProxyProtocol: "v2",
		DrainTimeout: 5 * time.Second, Health: HealthConfig{Interval: time.Hour, Fall: 100, EjectAfter: 3}}
	l := runLB(t, cfg, prometheus.NewRegistry(), good.addr, dead.addr)
	for i := range 30 {
		if g, err := greet(l.Addrs()[0].String(), ""); err != nil || !strings.HasPrefix(g, "good ") {
			t.Fatalf("connection %d: %q, %v", i, g, err)
		}
	}
	st := l.Status()
	for _, s := range st {
		if s.Addr == dead.addr && (s.State != "down" || s.ConnectFailures != 3 || s.LastError == "") {
			t.Fatalf("dead backend after 30 connections: %+v", s)
		}
		if s.Addr == good.addr && (s.State != "up" || s.TotalConnections != 30) {
			t.Fatalf("good backend after 30 connections: %+v", s)
		}
	}
	var m dto.Metric
	if err := l.metrics.errConnect.Write(&m); err != nil {
		t.Fatal(err)
	}
	if got := m.GetCounter().GetValue(); got != 3 {
		t.Fatalf("connect errors = %v, want 3", got)
	}
}

// TestHTTPHealthCheck: with LB_HEALTH_HTTP_PATH set, a backend whose TCP
// port is fine but whose /health answers 503 is taken out and comes back
// when it answers 200 again.
func TestHTTPHealthCheck(t *testing.T) {
	// Two edge hosts on distinct loopback addresses sharing one health port.
	var hosts = []string{"127.0.0.2", "127.0.0.3"}
	var port int
	var lns []net.Listener
	for attempt := 0; len(lns) < 2 && attempt < 50; attempt++ {
		for _, l := range lns {
			l.Close()
		}
		lns = nil
		first, err := net.Listen("tcp", hosts[0]+":0")
		if err != nil {
			t.Fatal(err)
		}
		port = first.Addr().(*net.TCPAddr).Port
		second, err := net.Listen("tcp", net.JoinHostPort(hosts[1], strconv.Itoa(port)))
		if err != nil {
			first.Close()
			continue
		}
		lns = []net.Listener{first, second}
	}
	if len(lns) < 2 {
		t.Fatal("no port free on both loopback addresses")
	}
	var mu sync.Mutex
	status := map[string]int{hosts[0]: 200, hosts[1]: 200}
	for i, ln := range lns {
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			defer mu.Unlock()
			if r.URL.Path != "/health" {
				w.WriteHeader(404)
				return
			}
			w.WriteHeader(status[hosts[i]])
		})}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
	}
	a := startBackend(t, "a", hosts[0]+":0")
	b := startBackend(t, "b", hosts[1]+":0")
	l := startLB(t, Config{Health: HealthConfig{Interval: 30 * time.Millisecond, Rise: 2, Fall: 2, HTTPPath: "/health", HTTPPort: port}}, a.addr, b.addr)
	waitHealthy := func(want int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for l.Pools()[0].Healthy() != want {
			if time.Now().After(deadline) {
				t.Fatalf("healthy backends = %d, want %d: %+v", l.Pools()[0].Healthy(), want, l.Status())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	mu.Lock()
	status[hosts[0]] = 503
	mu.Unlock()
	waitHealthy(1)
	for range 10 {
		if g, err := greet(l.Addrs()[0].String(), ""); err != nil || !strings.HasPrefix(g, "b ") {
			t.Fatalf("client reached %q, %v; backend a failed its HTTP check", g, err)
		}
	}
	if s := l.Status(); !slices.ContainsFunc(s, func(s BackendStatus) bool { return s.Addr == a.addr && strings.Contains(s.LastError, "503") }) {
		t.Fatalf("status does not show the failed check: %+v", s)
	}
	// With no edge up, readiness fails: GeoDNS leaves the region.
	health := service.NewHealth("zeitwork-load-balancer")
	health.AddCheck("edges", l.Ready)
	mux := http.NewServeMux()
	health.Register(mux, prometheus.NewRegistry())
	ready := func() (int, string) {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest("GET", "/health/ready", nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := ready(); code != 200 || l.Ready(t.Context()) != nil {
		t.Fatalf("/health/ready with one edge up = %d %s", code, body)
	}
	mu.Lock()
	status[hosts[1]] = 503
	mu.Unlock()
	waitHealthy(0)
	if code, body := ready(); code != 503 || !strings.Contains(body, "none of 2 edges is up") {
		t.Fatalf("/health/ready with no edge up = %d %s", code, body)
	}
	mu.Lock()
	status[hosts[0]] = 200
	status[hosts[1]] = 200
	mu.Unlock()
	waitHealthy(2)
	if code, body := ready(); code != 200 {
		t.Fatalf("/health/ready with the edges back = %d %s", code, body)
	}
}

// TestKeepaliveInherited checks what listen relies on: a socket accepted
// by a raw accept4, as the relay loops do, inherits keepalive (and its
// timing) and TCP_NODELAY from the listening socket.
func TestKeepaliveInherited(t *testing.T) {
	ln, err := listen(t.Context(), "127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	raw, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	var aerr error
	if err := raw.Control(func(lfd uintptr) { fd, _, aerr = unix.Accept4(int(lfd), unix.SOCK_CLOEXEC) }); err != nil || aerr != nil {
		t.Fatal(err, aerr)
	}
	defer unix.Close(fd)
	var opts [5]int
	var errs [5]error
	for i, o := range [][2]int{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE}, {unix.IPPROTO_TCP, unix.TCP_KEEPIDLE}, {unix.IPPROTO_TCP, unix.TCP_KEEPINTVL},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT}, {unix.IPPROTO_TCP, unix.TCP_NODELAY},
	} {
		opts[i], errs[i] = unix.GetsockoptInt(fd, o[0], o[1])
	}
	if err := errors.Join(errs[:]...); err != nil {
		t.Fatal(err)
	}
	if want := [5]int{1, int(keepaliveIdle / time.Second), int(keepaliveInterval / time.Second), keepaliveCount, 1}; opts != want {
		t.Fatalf("accepted socket keepalive, idle, interval, count, nodelay = %v, want %v", opts, want)
	}
}

// TestBackendKeepalive: the balancer's connection to a backend gets TCP
// keepalive once it has been open for KeepaliveAfter. The balancer runs in
// this process, so its socket is found among the process's descriptors by
// its peer address.
func TestBackendKeepalive(t *testing.T) {
	b := startBackend(t, "edge-a", "127.0.0.1:0")
	l := startLB(t, Config{KeepaliveAfter: 200 * time.Millisecond}, b.addr)
	c, err := net.Dial("tcp", l.Addrs()[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	want := netip.MustParseAddrPort(b.addr)
	deadline := time.Now().Add(5 * time.Second)
	for {
		found, ok := 0, false
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			fd, _ := strconv.Atoi(e.Name())
			sa, err := unix.Getpeername(fd)
			if sa4, ok := sa.(*unix.SockaddrInet4); err != nil || !ok || netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), uint16(sa4.Port)) != want {
				continue
			}
			found++
			on, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE)
			idle, _ := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
			ok = ok || on == 1 && idle == int(keepaliveIdle/time.Second)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no socket connected to the backend (of %d) has the balancer's keepalive", found)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
