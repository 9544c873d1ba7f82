package lb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/proxyproto"
)

// Listener forwards one public address to one port of every backend host.
type Listener struct {
	Addr       string // public listen address, e.g. ":8082"
	TargetPort int    // backend port, e.g. 443
}

// Config is the balancer's configuration.
type Config struct {
	Listeners      []Listener
	Algorithm      string
	ProxyProtocol  string // "v2", "v1" or "off"
	ConnectTimeout time.Duration
	DrainTimeout   time.Duration
	MaxConns       int
	Health         HealthConfig
	// KeepaliveAfter: a backend connection open this long gets TCP
	// keepalive (default 10s). Client sockets have it from the listener.
	KeepaliveAfter time.Duration
}

// LB is a running balancer: its listeners, pools and health checker.
type LB struct {
	cfg     Config
	log     *slog.Logger
	pools   []*Pool // one per listener
	lns     []*net.TCPListener
	metrics *metrics
	slots   chan struct{} // one per open client connection (MaxConns)
	dialer  *net.Dialer
	workers *workers

	mu sync.Mutex
	// conns are the open sockets, closed when the drain times out; a
	// backend socket still without keepalive maps to when it was opened
	// (unix nanos), everything else to 0.
	conns map[*net.TCPConn]int64
	wg    sync.WaitGroup // connection handlers

	gaugeMu sync.Mutex
	gauged  map[[2]string]bool // listener, backend pairs with published gauges
}

// New creates the balancer and binds its listeners.
func New(cfg Config, reg prometheus.Registerer, log *slog.Logger) (*LB, error) {
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 3 * time.Second
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = 20000
	}
	if cfg.KeepaliveAfter <= 0 {
		cfg.KeepaliveAfter = 10 * time.Second
	}
	if cfg.ProxyProtocol == "" {
		cfg.ProxyProtocol = "v2"
	}
	if cfg.ProxyProtocol != "v2" && cfg.ProxyProtocol != "v1" && cfg.ProxyProtocol != "off" {
		return nil, fmt.Errorf("unknown PROXY protocol version %q", cfg.ProxyProtocol)
	}
	cfg.Health.defaults()
	l := &LB{
		cfg: cfg, log: log, dialer: newDialer(cfg.ConnectTimeout), metrics: newMetrics(reg),
		slots: make(chan struct{}, cfg.MaxConns), conns: map[*net.TCPConn]int64{},
		workers: newWorkers(1024),
	}
	for _, ls := range cfg.Listeners {
		p, err := NewPool(cfg.Algorithm)
		if err != nil {
			l.closeListeners()
			return nil, err
		}
		ln, err := listen(context.Background(), ls.Addr)
		if err != nil {
			l.closeListeners()
			return nil, fmt.Errorf("cannot listen on %s: %w", ls.Addr, err)
		}
		l.pools = append(l.pools, p)
		l.lns = append(l.lns, ln)
	}
	return l, nil
}

// Addrs returns the bound public addresses (useful with port 0).
func (l *LB) Addrs() []net.Addr {
	out := make([]net.Addr, len(l.lns))
	for i, ln := range l.lns {
		out[i] = ln.Addr()
	}
	return out
}

// SetBackends sets the backend hosts. A bare host is used with each
// listener's TargetPort; a host:port is used as-is by the first listener
// and with TargetPort by the others.
func (l *LB) SetBackends(hosts []string) {
	for i, ls := range l.cfg.Listeners {
		addrs := make([]string, 0, len(hosts))
		for _, h := range hosts {
			host, port, err := net.SplitHostPort(h)
			if err != nil {
				host = h
			}
			if err != nil || i > 0 || port == "" {
				port = strconv.Itoa(ls.TargetPort)
			}
			addrs = append(addrs, net.JoinHostPort(host, port))
		}
		l.pools[i].Set(addrs)
	}
	l.updateGauges()
}

// Pools returns the listeners' pools, in Config.Listeners order.
func (l *LB) Pools() []*Pool { return l.pools }

// Run accepts and relays connections and health-checks backends until ctx
// ends, then stops accepting and drains open connections for up to
// DrainTimeout before closing them.
func (l *LB) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	hctx, cancelHealth := context.WithCancel(context.Background())
	wg.Go(func() { l.runHealth(hctx) })
	wg.Go(func() { l.runKeepalive(hctx) })
	stop := make(chan struct{})
	errc := make(chan error, len(l.lns))
	for i, ln := range l.lns {
		wg.Go(func() { errc <- l.accept(ln, l.pools[i], stop) })
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	close(stop)
	l.closeListeners()
	l.log.Info("draining", "open_sockets", l.openSockets(), "timeout", l.cfg.DrainTimeout.String())
	drained := make(chan struct{})
	go func() { l.wg.Wait(); close(drained) }()
	timer := time.NewTimer(l.cfg.DrainTimeout)
	select {
	case <-drained:
		timer.Stop()
	case <-timer.C:
		l.log.Warn("drain timeout reached; closing connections", "open_sockets", l.openSockets())
		l.mu.Lock()
		for c := range l.conns {
			_ = c.Close()
		}
		l.mu.Unlock()
		<-drained
	}
	cancelHealth()
	wg.Wait()
	l.workers.Close()
	return err
}

func (l *LB) closeListeners() {
	for _, ln := range l.lns {
		_ = ln.Close()
	}
}

func (l *LB) openSockets() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

func (l *LB) track(c *net.TCPConn, backend bool) {
	var opened int64
	if backend {
		opened = time.Now().UnixNano()
	}
	l.mu.Lock()
	l.conns[c] = opened
	l.mu.Unlock()
}

// runKeepalive gives backend connections that have been open for
// KeepaliveAfter TCP keepalive, until ctx ends. Short connections — most
// of them — never pay the four system calls; a long-lived one (a
// WebSocket, an idle HTTP/2 connection) is covered after KeepaliveAfter.
func (l *LB) runKeepalive(ctx context.Context) {
	t := time.NewTicker(l.cfg.KeepaliveAfter / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		due := time.Now().Add(-l.cfg.KeepaliveAfter).UnixNano()
		l.mu.Lock()
		for c, opened := range l.conns {
			if opened != 0 && opened <= due {
				_ = keepalive(c)
				l.conns[c] = 0
			}
		}
		l.mu.Unlock()
	}
}

func (l *LB) untrack(c *net.TCPConn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
}

// accept takes a connection slot before each Accept, so that at MaxConns
// new clients wait in the kernel's backlog (as with HAProxy's maxconn)
// instead of being accepted and dropped.
func (l *LB) accept(ln *net.TCPListener, pool *Pool, stop <-chan struct{}) error {
	var backoff time.Duration
	for {
		select {
		case l.slots <- struct{}{}:
		case <-stop:
			return nil
		}
		c, err := ln.AcceptTCP()
		if err != nil {
			<-l.slots
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors or a transient error: back off
			// instead of spinning, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.metrics.errAccept.Inc()
			l.log.Warn("accept failed; backing off", "err", err, "backoff", backoff.String())
			select {
			case <-time.After(backoff):
			case <-stop:
				return nil
			}
			continue
		}
		backoff = 0
		l.metrics.accepted.Inc()
		l.wg.Add(1)
		l.workers.Go(func() {
			defer l.wg.Done()
			defer func() { <-l.slots }()
			l.handle(c, pool)
		})
	}
}

// handle relays one client connection.
func (l *LB) handle(client *net.TCPConn, pool *Pool) {
	l.track(client, false)
	defer func() {
		l.untrack(client)
		_ = client.Close()
	}()
	caddr, _ := client.RemoteAddr().(*net.TCPAddr)
	if caddr == nil {
		return
	}
	upstream, b := l.connect(pool, caddr.IP)
	if upstream == nil {
		l.metrics.errNoBackend.Inc()
		return
	}
	l.track(upstream, true)
	defer func() {
		l.untrack(upstream)
		_ = upstream.Close()
	}()
	b.active.Add(1)
	b.total.Add(1)
	l.metrics.active.Inc()
	defer func() {
		b.active.Add(-1)
		l.metrics.active.Dec()
	}()

	var sent int64
	if l.cfg.ProxyProtocol != "off" {
		h := proxyproto.Header{Version: 2, Command: proxyproto.Proxy, Source: caddr, Destination: client.LocalAddr().(*net.TCPAddr)}
		if l.cfg.ProxyProtocol == "v1" {
			h.Version = 1
		}
		n, err := sendHeader(upstream, client, h.Format())
		if err != nil {
			l.metrics.errProxyHeader.Inc()
			return
		}
		sent = n
	}
	up, down := relay(client, upstream, l.workers)
	up += sent
	l.metrics.bytesIn.Add(float64(up))
	l.metrics.bytesOut.Add(float64(down))
}

// connect dials a backend chosen by the pool, trying up to three
// different backends when a connect fails.
func (l *LB) connect(pool *Pool, client net.IP) (*net.TCPConn, *Backend) {
	var tried [3]*Backend
	for attempt := range len(tried) {
		b := pool.Pick(client, tried[:attempt])
		if b == nil {
			return nil, nil
		}
		tried[attempt] = b
		c, err := l.dialer.Dial("tcp", b.Addr)
		if err != nil {
			l.metrics.errConnect.Inc()
			l.passiveFailure(b, err)
			continue
		}
		b.connected()
		return c.(*net.TCPConn), b
	}
	return nil, nil
}

// relay copies both directions until both have ended and returns the bytes
// sent upstream and downstream. Bytes move by splice(2) through a pipe
// (spliceCopy), never through Go memory.
//
// A direction that reaches EOF half-closes its destination (shutdown
// SHUT_WR) and the other direction keeps flowing, so a client that sends
// its request and then shuts down its side still gets the whole answer.
// The second direction to end needs no shutdown: both sockets are closed
// right after. A direction that fails (reset, timeout) closes both sockets,
// which ends the other one at once.
func relay(client, upstream *net.TCPConn, w *workers) (up, down int64) {
	var ended atomic.Int32
	pipe := func(dst, src *net.TCPConn) int64 {
		n, err := spliceCopy(dst, src)
		if err != nil {
			_ = client.Close()
			_ = upstream.Close()
		} else if ended.Add(1) == 1 {
			_ = rawCloseWrite(dst)
		}
		return n
	}
	done := make(chan int64, 1)
	w.Go(func() { done <- pipe(upstream, client) })
	down = pipe(client, upstream)
	return <-done, down
}

// Drain stops sending new connections to backends matching addr (host or
// host:port); Enable reverses it. They return how many backends matched.
func (l *LB) Drain(addr string, drain bool) int {
	n := 0
	for _, p := range l.pools {
		for _, b := range p.Backends() {
			host, _, _ := net.SplitHostPort(b.Addr)
			if b.Addr == addr || host == addr {
				b.draining.Store(drain)
				n++
			}
		}
	}
	return n
}
