package lb

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
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
}

// LB is a running balancer: its listeners, pools and health checker.
type LB struct {
	cfg     Config
	log     *slog.Logger
	pools   []*Pool // one per listener
	lns     []net.Listener
	metrics *metrics
	sem     chan struct{}
	dialer  net.Dialer

	mu    sync.Mutex
	hosts []string
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup // connection handlers
}

// New creates the balancer and binds its listeners.
func New(cfg Config, reg prometheus.Registerer, log *slog.Logger) (*LB, error) {
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 3 * time.Second
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = 20000
	}
	l := &LB{cfg: cfg, log: log, dialer: net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}, metrics: newMetrics(reg), sem: make(chan struct{}, cfg.MaxConns), conns: map[net.Conn]struct{}{}}
	for _, ls := range cfg.Listeners {
		p, err := NewPool(cfg.Algorithm)
		if err != nil {
			return nil, err
		}
		// TCP keepalive on both sides (Go enables it on accepted and
		// dialed connections; the period is set here once).
		lc := net.ListenConfig{KeepAlive: 30 * time.Second}
		ln, err := lc.Listen(context.Background(), "tcp", ls.Addr)
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

// SetBackends sets the backend hosts (host or host:port-less addresses);
// each listener forwards to host:TargetPort. An entry that already has a
// port is used as-is by the first listener and with TargetPort by others.
func (l *LB) SetBackends(hosts []string) {
	l.mu.Lock()
	l.hosts = append([]string(nil), hosts...)
	l.mu.Unlock()
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
	errc := make(chan error, len(l.lns))
	for i, ln := range l.lns {
		wg.Go(func() { errc <- l.accept(ln, l.pools[i]) })
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	l.closeListeners()
	l.log.Info("draining", "open_sockets", l.openConns(), "timeout", l.cfg.DrainTimeout.String())
	drained := make(chan struct{})
	go func() { l.wg.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(l.cfg.DrainTimeout):
		l.log.Warn("drain timeout reached; closing connections", "open_sockets", l.openConns())
		l.mu.Lock()
		for c := range l.conns {
			c.Close()
		}
		l.mu.Unlock()
		<-drained
	}
	cancelHealth()
	wg.Wait()
	return err
}

func (l *LB) closeListeners() {
	for _, ln := range l.lns {
		ln.Close()
	}
}

func (l *LB) openConns() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

func (l *LB) track(c net.Conn, add bool) {
	l.mu.Lock()
	if add {
		l.conns[c] = struct{}{}
	} else {
		delete(l.conns, c)
	}
	l.mu.Unlock()
}

func (l *LB) accept(ln net.Listener, pool *Pool) error {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, errTooManyFiles) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				l.log.Warn("accept failed; backing off", "err", err, "backoff", backoff.String())
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		backoff = 0
		l.metrics.accepted.Inc()
		select {
		case l.sem <- struct{}{}:
		default:
			l.metrics.errors.WithLabelValues("max_conns").Inc()
			c.Close()
			continue
		}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer func() { <-l.sem }()
			l.handle(c.(*net.TCPConn), pool)
		}()
	}
}

// handle relays one client connection.
func (l *LB) handle(client *net.TCPConn, pool *Pool) {
	defer client.Close()
	l.track(client, true)
	defer l.track(client, false)
	caddr := client.RemoteAddr().(*net.TCPAddr)

	var tried []*Backend
	var upstream *net.TCPConn
	var b *Backend
	for attempt := 0; attempt < 3; attempt++ {
		b = pool.Pick(caddr.IP, tried)
		if b == nil {
			break
		}
		tried = append(tried, b)
		c, err := l.dialer.Dial("tcp", b.Addr)
		if err != nil {
			l.metrics.errors.WithLabelValues("connect").Inc()
			l.passiveFailure(b, err)
			continue
		}
		upstream = c.(*net.TCPConn)
		break
	}
	if upstream == nil {
		l.metrics.errors.WithLabelValues("no_backend").Inc()
		return
	}
	defer upstream.Close()
	l.track(upstream, true)
	defer l.track(upstream, false)
	b.active.Add(1)
	b.total.Add(1)
	l.metrics.active.Inc()
	defer func() { b.active.Add(-1); l.metrics.active.Dec() }()

	switch l.cfg.ProxyProtocol {
	case "v2":
		dst := client.LocalAddr().(*net.TCPAddr)
		if _, err := upstream.Write(proxyproto.AppendV2(make([]byte, 0, 52), caddr, dst)); err != nil {
			l.metrics.errors.WithLabelValues("proxy_header").Inc()
			return
		}
	case "v1":
		h := proxyproto.Header{Version: 1, Command: proxyproto.Proxy, Source: caddr, Destination: client.LocalAddr().(*net.TCPAddr)}
		if _, err := upstream.Write(h.Format()); err != nil {
			l.metrics.errors.WithLabelValues("proxy_header").Inc()
			return
		}
	}

	// Relay both directions; io.Copy between TCP connections uses splice(2),
	// so payload bytes never enter Go. Each side half-closes the other when
	// its source reaches EOF.
	done := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(upstream, client)
		_ = upstream.CloseWrite()
		done <- n
	}()
	down, _ := io.Copy(client, upstream)
	_ = client.CloseWrite()
	up := <-done
	l.metrics.bytes.WithLabelValues("in").Add(float64(up))
	l.metrics.bytes.WithLabelValues("out").Add(float64(down))
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
