// Package geodns is Zeitwork's authoritative DNS server for the platform
// zones (zeitwork-dns). It answers the edge name, and the apps wildcard,
// with the load balancers of the client's region — chosen by EDNS Client
// Subnet or the query's source address — skipping regions whose load
// balancers all fail their health checks, and serves static records (the
// database's name, name servers). The configuration is one JSON file,
// reloaded on SIGHUP; a bad file is rejected and the old one keeps
// serving. See docs/adr/0801-geodns.md.
package geodns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
)

// Server is the DNS server: a UDP and a TCP listener on one address, the
// health checker, and the current configuration.
type Server struct {
	log     *slog.Logger
	data    atomic.Pointer[data]
	checker *checker
	metrics *metrics
	loaded  atomic.Int64 // Unix time of the current configuration

	udp    net.PacketConn
	tcp    net.Listener
	maxTCP int // open TCP connections at most; Accept waits beyond
}

// maxTCPConns bounds open TCP connections: each costs a goroutine and
// buffers, and idle ones are closed within 10 s.
const maxTCPConns = 1000

// New compiles c and returns a server that is not listening yet. Its
// metrics are registered with reg.
func New(c *Config, reg prometheus.Registerer, log *slog.Logger) (*Server, error) {
	d, err := compile(c, time.Now())
	if err != nil {
		return nil, err
	}
	s := &Server{log: log, maxTCP: maxTCPConns}
	s.checker = newChecker(d.health, d.targets, log)
	s.data.Store(d)
	s.loaded.Store(time.Now().Unix())
	s.metrics = newMetrics(s)
	if reg != nil {
		if err := s.metrics.register(reg); err != nil {
			return nil, fmt.Errorf("cannot register DNS metrics: %w", err)
		}
	}
	return s, nil
}

// Reload swaps in a new configuration. Load balancers that stay keep their
// health state; new ones are checked at once. An invalid configuration is
// rejected and the current one stays.
func (s *Server) Reload(c *Config) error {
	d, err := compile(c, time.Now())
	if err != nil {
		s.metrics.reloads.WithLabelValues("error").Inc()
		return err
	}
	// Targets first: a new load balancer counts as up until checked, so
	// the new answers never reference a target the checker lacks.
	s.checker.update(d.health, d.targets)
	s.data.Store(d)
	s.loaded.Store(time.Now().Unix())
	s.metrics.reloads.WithLabelValues("ok").Inc()
	return nil
}

// ReloadFile reads path and reloads from it; a file that cannot be read or
// is invalid is rejected and the current configuration stays.
func (s *Server) ReloadFile(path string) error {
	c, err := LoadFile(path)
	if err != nil {
		s.metrics.reloads.WithLabelValues("error").Inc()
		return err
	}
	return s.Reload(c)
}

// Listen binds UDP and TCP on addr (host:port). With port 0 both get the
// same free port.
func (s *Server) Listen(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("DNS listen address %q: %w", addr, err)
	}
	for attempt := 0; ; attempt++ {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return fmt.Errorf("cannot listen on udp %s: %w", addr, err)
		}
		tcpAddr := addr
		if port == "0" {
			tcpAddr = net.JoinHostPort(host, fmt.Sprint(pc.LocalAddr().(*net.UDPAddr).Port))
		}
		ln, err := net.Listen("tcp", tcpAddr)
		if err != nil {
			pc.Close()
			if port == "0" && errors.Is(err, syscall.EADDRINUSE) && attempt < 20 {
				continue
			}
			return fmt.Errorf("cannot listen on tcp %s: %w", tcpAddr, err)
		}
		s.udp, s.tcp = pc, newLimitListener(ln, s.maxTCP)
		return nil
	}
}

// Addr returns the bound host:port (after Listen).
func (s *Server) Addr() string { return s.udp.LocalAddr().String() }

// Run serves DNS and runs the health checks until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	if s.udp == nil {
		return errors.New("geodns: Run before Listen")
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.checker.Run(gctx) })
	g.Go(func() error {
		return serve(gctx, &dns.Server{PacketConn: s.udp, Handler: s, UDPSize: ednsUDPSize, MsgInvalidFunc: s.invalid}, "udp")
	})
	g.Go(func() error {
		return serve(gctx, &dns.Server{
			Listener: s.tcp, Handler: s,
			ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second,
			IdleTimeout:   func() time.Duration { return 10 * time.Second },
			MaxTCPQueries: 256, MsgInvalidFunc: s.invalid,
		}, "tcp")
	})
	return g.Wait()
}

// serve runs srv until ctx ends, then shuts it down.
func serve(ctx context.Context, srv *dns.Server, network string) error {
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	errc := make(chan error, 1)
	go func() { errc <- srv.ActivateAndServe() }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve DNS over %s: %w", network, err)
	case <-ctx.Done():
	}
	select {
	case <-started:
	case err := <-errc:
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := srv.ShutdownContext(sctx)
	<-errc
	if err != nil {
		return fmt.Errorf("shut down DNS over %s: %w", network, err)
	}
	return nil
}

// invalid counts a packet that did not parse (answered FORMERR when its
// header did, else dropped).
func (s *Server) invalid([]byte, error) { s.metrics.malformed.Inc() }

// ServeDNS answers one query.
func (s *Server) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	var src netip.Addr
	udp := false
	switch a := w.RemoteAddr().(type) {
	case *net.UDPAddr:
		src, udp = addrOf(a.IP), true
	case *net.TCPAddr:
		src = addrOf(a.IP)
	}
	var (
		m   *dns.Msg
		out outcome
	)
	func() {
		defer func() {
			if p := recover(); p != nil {
				s.log.Error("DNS query handler panicked", "panic", fmt.Sprint(p))
				s.metrics.panics.Inc()
				m = new(dns.Msg).SetRcode(req, dns.RcodeServerFailure)
				out = outcome{clientRegion: "default"}
			}
		}()
		m, out = s.data.Load().respond(req, src, s.checker.up, rand.Uint32())
	}()
	size := dns.MaxMsgSize
	if udp {
		size = dns.MinMsgSize
		if opt := req.IsEdns0(); opt != nil {
			size = max(dns.MinMsgSize, min(int(opt.UDPSize()), ednsUDPSize))
		}
	}
	m.Truncate(size)
	if m.Truncated {
		s.metrics.truncated.Inc()
	}
	if err := w.WriteMsg(m); err != nil {
		s.log.Debug("cannot write DNS answer", "err", err, "client", src.String())
	}
	s.metrics.observe(req, m, out)
}

// limitListener holds at most cap(slots) accepted connections open.
type limitListener struct {
	net.Listener
	slots  chan struct{}
	closed chan struct{}
	once   sync.Once
}

func newLimitListener(ln net.Listener, n int) *limitListener {
	return &limitListener{Listener: ln, slots: make(chan struct{}, n), closed: make(chan struct{})}
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-l.closed:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return &limitConn{Conn: c, release: sync.OnceFunc(func() { <-l.slots })}, nil
}

// Close ends a waiting Accept too.
func (l *limitListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

type limitConn struct {
	net.Conn
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.release()
	return err
}

func addrOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// Ready reports an error until every load balancer has been checked once.
func (s *Server) Ready() error { return s.checker.ready() }

// RegionStatus is one region's health as /health reports it.
type RegionStatus struct {
	Healthy       bool       `json:"healthy"`
	LoadBalancers []LBStatus `json:"load_balancers"`
}

// LBStatus is one load balancer's health check state.
type LBStatus struct {
	Address string    `json:"address"`
	Check   string    `json:"check"`
	Up      bool      `json:"up"`
	Checked bool      `json:"checked"`
	Error   string    `json:"error,omitempty"`
	Since   time.Time `json:"since,omitzero"`
}

// Regions returns every region's health.
func (s *Server) Regions() map[string]RegionStatus {
	d := s.data.Load()
	out := make(map[string]RegionStatus, len(d.regions))
	for _, r := range d.regions {
		rs := RegionStatus{}
		for _, l := range r.lbs {
			st := s.checker.status(l.key)
			rs.Healthy = rs.Healthy || st.Up
			rs.LoadBalancers = append(rs.LoadBalancers, LBStatus{Address: l.addr.String(), Check: l.key, Up: st.Up, Checked: st.Known, Error: st.Err, Since: st.Since})
		}
		out[r.name] = rs
	}
	return out
}

// HealthInfo is merged into /health.
func (s *Server) HealthInfo() map[string]any {
	d := s.data.Load()
	zones := make([]string, 0, len(d.zones))
	for _, z := range d.zones {
		zones = append(zones, z.name)
	}
	sort.Strings(zones)
	return map[string]any{
		"zones":            zones,
		"regions":          s.Regions(),
		"config_loaded_at": time.Unix(s.loaded.Load(), 0).UTC().Format(time.RFC3339),
	}
}
