package edge

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/zeitwork/zeitwork/internal/edge/h2"
	"github.com/zeitwork/zeitwork/internal/edge/routetable"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/proxyproto"
	"github.com/zeitwork/zeitwork/internal/service"
)

// ServiceConfig is everything zeitwork-edge-proxy reads from its
// environment.
type ServiceConfig struct {
	Proxy          Config
	HTTPSAddr      string
	HTTPAddr       string
	AdvertiseHTTPS string
	AdvertiseHTTP  string
	ID             string
	Region         string
	Operators      []*url.URL
	CertFile       string
	KeyFile        string
	Trusted        func(net.IP) bool
	StateDir       string
	Drain          time.Duration
	ACME           ACMEConfig
	// Sockets, when set, provides the listening sockets: those a previous
	// process passed in an upgrade (internal/handover), or new ones it
	// then passes on. Nil binds them directly.
	Sockets Sockets
}

// Sockets hands listening sockets over between processes
// (*handover.Handover).
type Sockets interface {
	Listen(key string, bind func() (net.Listener, error)) (net.Listener, error)
}

// LoadServiceConfig reads the environment, recording problems in l.
func LoadServiceConfig(l *envconfig.Loader) ServiceConfig {
	c := ServiceConfig{
		HTTPSAddr: l.Addr("HTTPS_ADDR", l.String("PORT", ":443")),
		HTTPAddr:  l.Addr("HTTP_ADDR", ":8083"),
		Region:    l.String("REGION", "local"),
		Operators: l.URLs("OPERATOR_URL", nil),
		CertFile:  l.File("SSL_CERT_PATH", "", true),
		KeyFile:   l.File("SSL_KEY_PATH", "", true),
		StateDir:  l.String("STATE_DIR", "/var/lib/zeitwork-edge"),
		Drain:     l.Duration("DRAIN_TIMEOUT", 20*time.Second),
	}
	c.Proxy = Config{
		AppsDomain:   strings.ToLower(l.String("APPS_DOMAIN", "zeitwork.app")),
		ClusterToken: l.String("CLUSTER_TOKEN", ""),
		RateRPS:      l.Float("RATE_LIMIT_RPS", 100),
		RateBurst:    l.Int("RATE_LIMIT_BURST", 200, 1, 1_000_000),
		RateMaxKeys:  l.Int("RATE_LIMIT_MAX_CLIENTS", 100_000, 100, 100_000_000),
		MaxBodyBytes: int64(l.Int("MAX_BODY_MIB", 100, 1, 1<<20)) << 20,
		AccessLog:    l.Bool("ACCESS_LOG", true),
		Region:       l.String("REGION", "local"),
		// Node agents are normally in the edge's region: a dial that
		// takes longer is to a node that is gone.
		ConnectTimeout: l.Duration("UPSTREAM_CONNECT_TIMEOUT", 2*time.Second),
		TryTimeout:     l.Duration("UPSTREAM_TRY_TIMEOUT", 3*time.Second),
	}
	trusted, err := proxyproto.ParseTrusted(l.List("TRUSTED_PROXIES", nil))
	if err != nil {
		l.Errorf("TRUSTED_PROXIES", "%v", err)
	}
	c.Trusted = trusted
	host, _ := os.Hostname()
	c.ID = l.String("EDGE_ID", host+c.HTTPSAddr)
	c.AdvertiseHTTPS = l.String("EDGE_ADVERTISE_HTTPS", advertise(c.HTTPSAddr))
	c.AdvertiseHTTP = l.String("EDGE_ADVERTISE_HTTP", advertise(c.HTTPAddr))
	if len(c.Operators) > 0 && c.Proxy.ClusterToken == "" {
		l.Errorf("CLUSTER_TOKEN", "is required with OPERATOR_URL")
	}
	c.ACME = loadACME(l)
	return c
}

func advertise(addr string) string {
	host, port, _ := net.SplitHostPort(addr)
	if host == "" {
		host, _ = os.Hostname()
	}
	return net.JoinHostPort(host, port)
}

// Server is a running edge proxy.
type Server struct {
	cfg             ServiceConfig
	log             *slog.Logger
	Proxy           *Proxy
	Routes          *routetable.Client
	certs           *CertStore
	acme            *acmeManager
	health          *service.Health
	reg             *prometheus.Registry
	admin           *http.ServeMux
	httpsLn, httpLn net.Listener
	// H2 bounds the HTTP/2 connections (zero fields: the defaults of
	// internal/edge/h2); set before Run.
	H2 h2.Config
}

// NewServer builds the server and binds its listeners.
func NewServer(ctx context.Context, cfg ServiceConfig, reg *prometheus.Registry, health *service.Health, log *slog.Logger) (*Server, error) {
	s := &Server{cfg: cfg, log: log, health: health, reg: reg}
	s.Routes = routetable.New(routetable.Options{Operators: cfg.Operators, Token: cfg.Proxy.ClusterToken,
		StateFile: filepath.Join(cfg.StateDir, "routes.json"), Log: log})
	s.Proxy = New(cfg.Proxy, s.Routes, reg, log)
	var err error
	if s.certs, err = NewCertStore(cfg.CertFile, cfg.KeyFile, func(t time.Time) { s.Proxy.CertExpiry("wildcard", t) }); err != nil {
		return nil, err
	}
	if cfg.ACME.Enabled() {
		if s.acme, err = newACME(ctx, cfg.ACME, s.Routes, log, func(result string) { s.Proxy.m.acme.WithLabelValues(result).Inc() }); err != nil {
			return nil, err
		}
		s.Proxy.m.certExpiry.setACME(s.acme.earliestExpiry)
	}
	s.admin = http.NewServeMux()
	health.Register(s.admin, reg)
	health.SetInfo(func() map[string]any {
		st := s.Routes.Staleness()
		return map[string]any{"routes": len(s.Routes.Table().Routes), "route_table_version": s.Routes.Table().Version,
			"route_table_staleness_seconds": st.Seconds()}
	})
	s.admin.HandleFunc("GET /api/v1/rate-limit/status", s.rateStatus)
	lc := net.ListenConfig{KeepAlive: 30 * time.Second}
	listen := func(addr string) (net.Listener, error) {
		bind := func() (net.Listener, error) { return lc.Listen(ctx, "tcp", addr) }
		var ln net.Listener
		var err error
		if cfg.Sockets != nil {
			ln, err = cfg.Sockets.Listen("edge:"+addr, bind)
		} else {
			ln, err = bind()
		}
		if err != nil {
			return nil, fmt.Errorf("cannot listen on %s: %w", addr, err)
		}
		return ln, nil
	}
	if s.httpsLn, err = listen(cfg.HTTPSAddr); err != nil {
		return nil, err
	}
	if s.httpLn, err = listen(cfg.HTTPAddr); err != nil {
		s.httpsLn.Close()
		return nil, err
	}
	return s, nil
}

// Addrs are the bound HTTPS and HTTP addresses.
func (s *Server) Addrs() (https, http net.Addr) { return s.httpsLn.Addr(), s.httpLn.Addr() }

func (s *Server) rateStatus(w http.ResponseWriter, r *http.Request) {
	out := map[string]any{"rps": s.cfg.Proxy.RateRPS, "burst": s.cfg.Proxy.RateBurst, "max_clients": s.cfg.Proxy.RateMaxKeys}
	if l := s.Proxy.Limiter(); l != nil {
		out["tracked_clients"] = l.Len()
		out["top_limited"] = l.Top(20)
	} else {
		out["enabled"] = false
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func (s *Server) getCertificate(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
	name := lowerSNI(h)
	if name == "" || s.certs.Covers(name) {
		return s.certs.Get(), nil
	}
	if s.acme != nil {
		return s.acme.GetCertificate(h)
	}
	return s.certs.Get(), nil
}

// httpHandler serves :8083: ACME HTTP-01, HTTPS redirects for customer
// domains, health/metrics/rate-limit status, and plain HTTP for internal
// traffic.
func (s *Server) httpHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.acme != nil && s.acme.HandleHTTPChallenge(w, r) {
			return
		}
		host := hostOf(r.Host)
		route := s.Routes.Table().Lookup(host)
		if route == nil {
			if p := r.URL.Path; p == "/health" || strings.HasPrefix(p, "/health/") || p == "/metrics" || p == "/api/v1/rate-limit/status" {
				s.admin.ServeHTTP(w, r)
				return
			}
		}
		if route != nil && route.Kind == "custom" {
			target := "https://" + host + r.URL.RequestURI()
			http.Redirect(w, r, target, http.StatusPermanentRedirect)
			return
		}
		s.Proxy.ServeHTTP(w, r)
	})
}

// Run serves until ctx ends, then drains.
func (s *Server) Run(ctx context.Context, reload <-chan struct{}) error {
	wrap := func(ln net.Listener) net.Listener {
		return proxyproto.NewListener(polledListener{ln}, proxyproto.ListenerConfig{Trusted: s.cfg.Trusted, HeaderTimeout: 5 * time.Second,
			OnReject: func(peer net.Addr, err error) {
				if errors.Is(err, proxyproto.ErrUntrusted) {
					s.log.Warn("rejected PROXY header from an untrusted peer", "peer", peer.String())
				} else {
					s.log.Debug("connection closed before a request", "peer", peer.String(), "err", err)
				}
			}})
	}
	tlsCfg := TLSConfig(s.getCertificate)
	if s.acme != nil {
		tlsCfg.NextProtos = append(tlsCfg.NextProtos, "acme-tls/1") // TLS-ALPN-01
	}
	// Both ports run through a front: plain HTTP/1.1 requests take the
	// fast path, everything else these net/http servers.
	httpsSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tlsState(r)
		s.Proxy.ServeHTTP(w, r)
	}), TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout: 120 * time.Second, MaxHeaderBytes: 64 << 10, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}
	httpSrv := &http.Server{Handler: s.httpHandler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 120 * time.Second,
		MaxHeaderBytes: 64 << 10, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}
	httpsFront := newFront(s.Proxy, tlsCfg, httpsSrv, func(*routetable.Route, []byte) bool { return true }, s.log)
	httpsFront.h2cfg = s.H2
	// On :8083 ACME challenges and the HTTPS redirects of customer
	// domains stay with net/http (httpHandler).
	httpFront := newFront(s.Proxy, nil, httpSrv, func(r *routetable.Route, target []byte) bool {
		return r.Kind != "custom" && !bytes.HasPrefix(target, []byte("/.well-known/acme-challenge/"))
	}, s.log)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.Routes.Run(gctx) })
	g.Go(func() error { return httpsFront.serve(gctx, wrap(s.httpsLn), s.cfg.Drain) })
	g.Go(func() error { return httpFront.serve(gctx, wrap(s.httpLn), s.cfg.Drain) })
	g.Go(func() error { s.maintain(gctx, reload); return nil })
	return g.Wait()
}

// maintain reloads the certificate (SIGHUP or file change) and heartbeats
// to the operators so load balancers find this edge.
func (s *Server) maintain(ctx context.Context, reload <-chan struct{}) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	s.heartbeat(ctx)
	for {
		select {
		case <-ctx.Done():
			s.health.SetDraining()
			return
		case <-reload:
			if err := s.certs.Reload(); err != nil {
				s.log.Error("certificate reload failed; keeping the previous one", "err", err)
			} else {
				s.log.Info("certificate reloaded")
			}
		case <-t.C:
			s.Proxy.PruneState()
			if s.certs.ChangedOnDisk() {
				if err := s.certs.Reload(); err == nil {
					s.log.Info("certificate changed on disk; reloaded")
				}
			}
			s.heartbeat(ctx)
		}
	}
}

func (s *Server) heartbeat(ctx context.Context) {
	if len(s.cfg.Operators) == 0 {
		return
	}
	b, _ := json.Marshal(map[string]string{"id": s.cfg.ID, "region": s.cfg.Region, "https_address": s.cfg.AdvertiseHTTPS, "http_address": s.cfg.AdvertiseHTTP})
	for _, op := range s.cfg.Operators {
		req, _ := http.NewRequestWithContext(ctx, "POST", op.JoinPath("/api/v1/internal/edges/heartbeat").String(), bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+s.cfg.Proxy.ClusterToken)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				return
			}
		}
	}
}

func urlParse(s string) (*url.URL, error) { return url.Parse(s) }
