package lb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
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
	// Sockets, when set, provides the public listening sockets: those a
	// previous process passed in an upgrade (internal/handover), or new
	// ones it then passes on. Nil binds them directly.
	Sockets Sockets
}

// Sockets hands listening sockets over between processes
// (*handover.Handover).
type Sockets interface {
	// Inherited is how many sockets of key the previous process passed.
	Inherited(key string) int
	// Listen returns the next inherited socket of key, or bind's.
	Listen(key string, bind func() (net.Listener, error)) (net.Listener, error)
}

// LB is a running balancer: its listeners, pools, relay loops and health
// checker.
type LB struct {
	cfg     Config
	log     *slog.Logger
	pools   []*Pool // one per listener
	loops   []*loop // one per P, each with its own socket of every listener
	metrics *metrics
	open    atomic.Int64 // client connections open, all loops
	// failed is closed when a loop ends on an error (Run then stops).
	failed   chan struct{}
	failOnce sync.Once

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
	l := &LB{cfg: cfg, log: log, metrics: newMetrics(reg), failed: make(chan struct{})}
	for range cfg.Listeners {
		p, err := NewPool(cfg.Algorithm)
		if err != nil {
			return nil, err
		}
		l.pools = append(l.pools, p)
	}
	// One loop per P. With several, each binds its own socket of every
	// listener (SO_REUSEPORT) and the kernel spreads clients over them.
	// After an upgrade, one loop per socket the previous process passed:
	// every one of them must keep being accepted from.
	n := runtime.GOMAXPROCS(0)
	if cfg.Sockets != nil {
		inherited := 0
		for _, ls := range cfg.Listeners {
			inherited = max(inherited, cfg.Sockets.Inherited(socketKey(ls)))
		}
		if inherited > 0 {
			n = inherited
		}
	}
	sockets := make([][]*net.TCPListener, n)
	closeAll := func() {
		for _, lns := range sockets {
			for _, ln := range lns {
				_ = ln.Close()
			}
		}
	}
	for _, ls := range cfg.Listeners {
		addr := ls.Addr
		for i := range n {
			ln, err := l.bind(ls, addr, n > 1)
			if err != nil {
				closeAll()
				return nil, fmt.Errorf("cannot listen on %s: %w", ls.Addr, err)
			}
			if host, _, err := net.SplitHostPort(ls.Addr); err == nil {
				// The others bind the port the first got (for port 0).
				addr = net.JoinHostPort(host, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
			}
			sockets[i] = append(sockets[i], ln)
		}
	}
	for i := range n {
		lp, err := newLoop(l, sockets[i], (cfg.MaxConns+n-1)/n)
		if err != nil {
			for _, lp := range l.loops {
				lp.closeAll()
			}
			closeAll()
			return nil, err
		}
		l.loops = append(l.loops, lp)
	}
	return l, nil
}

// socketKey names a listener's sockets in a handover.
func socketKey(ls Listener) string { return "lb:" + ls.Addr }

func (l *LB) bind(ls Listener, addr string, reusePort bool) (*net.TCPListener, error) {
	bind := func() (net.Listener, error) { return listen(context.Background(), addr, reusePort) }
	if l.cfg.Sockets == nil {
		ln, err := bind()
		if err != nil {
			return nil, err
		}
		return ln.(*net.TCPListener), nil
	}
	ln, err := l.cfg.Sockets.Listen(socketKey(ls), bind)
	if err != nil {
		return nil, err
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("socket of %s is %T, not TCP", ls.Addr, ln)
	}
	return tl, nil
}

// Addrs returns the bound public addresses (useful with port 0).
func (l *LB) Addrs() []net.Addr {
	out := make([]net.Addr, len(l.loops[0].lns))
	for i, ln := range l.loops[0].lns {
		out[i] = ln.ln.Addr()
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

// Run relays connections and health-checks backends until ctx ends, then
// stops accepting and drains open connections for up to DrainTimeout
// before closing them.
func (l *LB) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	hctx, cancelHealth := context.WithCancel(context.Background())
	wg.Go(func() { l.runHealth(hctx) })
	var loops sync.WaitGroup
	for _, lp := range l.loops {
		loops.Go(lp.run)
	}
	ended := make(chan struct{})
	wg.Go(func() { loops.Wait(); close(ended) })
	select {
	case <-ctx.Done():
	case <-l.failed: // the other loops are told to stop below
	}
	for _, lp := range l.loops {
		lp.command(cmdStopAccepting)
	}
	l.log.Info("draining", "open_connections", l.open.Load(), "timeout", l.cfg.DrainTimeout.String())
	timer := time.NewTimer(l.cfg.DrainTimeout)
	select {
	case <-ended:
		timer.Stop()
	case <-timer.C:
		l.log.Warn("drain timeout reached; closing connections", "open_connections", l.open.Load())
		for _, lp := range l.loops {
			lp.command(cmdCloseAll)
		}
		<-ended
	}
	cancelHealth()
	wg.Wait()
	var errs []error
	for _, lp := range l.loops {
		_ = unix.Close(lp.wake.fd)
		errs = append(errs, lp.err)
	}
	return errors.Join(errs...)
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
