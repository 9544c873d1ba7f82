// Package dataplane is the node's public HTTP front (:8081) as a process of
// its own, so that traffic to the microVMs keeps flowing while the node
// agent is down or restarting (ADR 0354).
//
// A request carrying X-Zeitwork-Instance (and the cluster token in
// X-Zeitwork-Token) is proxied to that instance's VM, looked up in a
// routing table the agent writes to a file; every other request (the
// agent's API, /health, /metrics) is proxied to the agent over a Unix
// socket and answered 503 agent_unavailable while the agent is down. The
// data plane's own liveness and metrics live under /dataplane/.
package dataplane

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/zeitwork/zeitwork/internal/fsutil"
	"github.com/zeitwork/zeitwork/internal/httpjson"
	"github.com/zeitwork/zeitwork/internal/service"
)

// Header names of the data-plane contract with edge proxies.
const (
	HeaderInstance = "X-Zeitwork-Instance"
	HeaderToken    = "X-Zeitwork-Token"
)

// TableFormat is the version of the table file's layout this build reads
// and writes.
const TableFormat = 1

// StateRunning is the only state in which an instance receives traffic.
const StateRunning = "running"

// Table is the routing table the node agent hands to the data plane.
type Table struct {
	Format    int              `json:"format"`
	NodeID    string           `json:"node_id,omitempty"`
	WrittenAt time.Time        `json:"written_at"`
	Instances map[string]Route `json:"instances"`
}

// Route is where one instance is served: its guest address and app port
// (set while it runs) and its lifecycle state.
type Route struct {
	State string `json:"state"`
	Addr  string `json:"addr,omitempty"`
}

// WriteTable replaces the table file atomically (temporary file, rename),
// so a reader sees the old table or the new one, never a part.
func WriteTable(path string, t Table) error {
	t.Format = TableFormat
	if t.Instances == nil {
		t.Instances = map[string]Route{}
	}
	b, err := json.Marshal(t)
	if err != nil {
		return fmt.Errorf("cannot encode the routing table: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("cannot write the routing table: %w", err)
	}
	if err := fsutil.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("cannot write the routing table %s: %w", path, err)
	}
	return nil
}

// parseTable decodes and validates a table file.
func parseTable(b []byte) (*Table, error) {
	var t Table
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&t); err != nil {
		return nil, fmt.Errorf("malformed routing table: %w", err)
	}
	if t.Format != TableFormat {
		return nil, fmt.Errorf("routing table format %d, this build reads %d", t.Format, TableFormat)
	}
	if t.Instances == nil {
		return nil, errors.New("routing table without instances")
	}
	for id, r := range t.Instances {
		if r.Addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(r.Addr); err != nil {
			return nil, fmt.Errorf("instance %s: bad address %q", id, r.Addr)
		}
	}
	return &t, nil
}

// gone reports whether an address of prev is no longer served in next.
func gone(prev, next *Table) bool {
	live := map[string]bool{}
	for _, r := range next.Instances {
		live[r.Addr] = true
	}
	for _, r := range prev.Instances {
		if r.Addr != "" && !live[r.Addr] {
			return true
		}
	}
	return false
}

// Config is the data plane's configuration.
type Config struct {
	Token       string        // cluster token; empty accepts any (development)
	TablePath   string        // the routing table the agent writes
	AgentSocket string        // the agent's API socket
	Poll        time.Duration // how often the table file is checked; default 200ms
	// Info is merged into /dataplane/health (version, pid, address).
	Info map[string]any
}

// Server is the data plane: the HTTP handler and the table watcher.
type Server struct {
	cfg         Config
	log         *slog.Logger
	table       atomic.Pointer[Table]
	mu          sync.Mutex // serialises reloads
	last        []byte     // the table file as last read
	reg         *prometheus.Registry
	vm          *httputil.ReverseProxy
	vmTransport *http.Transport
	agent       *httputil.ReverseProxy
	proxied     *prometheus.CounterVec
	reloads     *prometheus.CounterVec
	routes      prometheus.Gauge
	started     time.Time
}

// New returns a data plane serving an empty table until the first Reload.
func New(cfg Config, log *slog.Logger) *Server {
	if cfg.Poll <= 0 {
		cfg.Poll = 200 * time.Millisecond
	}
	s := &Server{cfg: cfg, log: log, reg: service.NewRegistry("zeitwork_dataplane"), started: time.Now()}
	s.table.Store(&Table{Format: TableFormat, Instances: map[string]Route{}})
	s.proxied = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_dataplane_proxied_requests_total", Help: "Requests proxied to VMs by status class (error: the VM did not answer)."}, []string{"class"})
	s.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_dataplane_table_reloads_total", Help: "Routing table reloads by result."}, []string{"result"})
	s.routes = prometheus.NewGauge(prometheus.GaugeOpts{Name: "zeitwork_dataplane_routes", Help: "Instances in the routing table."})
	s.reg.MustRegister(s.proxied, s.reloads, s.routes)
	s.vm = s.newVMProxy()
	s.agent = s.newAgentProxy()
	return s
}

// Reload reads the table file; a missing, unchanged or bad file leaves the
// current table in place (a bad one is reported).
func (s *Server) Reload() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := os.ReadFile(s.cfg.TablePath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cannot read the routing table: %w", err)
	}
	if bytes.Equal(b, s.last) {
		return nil
	}
	s.last = b
	t, err := parseTable(b)
	if err != nil {
		s.reloads.WithLabelValues("error").Inc()
		return fmt.Errorf("%s: %w (keeping the previous table)", s.cfg.TablePath, err)
	}
	if prev := s.table.Swap(t); gone(prev, t) {
		// An address that left the table may go to another VM next.
		s.vmTransport.CloseIdleConnections()
	}
	s.reloads.WithLabelValues("ok").Inc()
	s.routes.Set(float64(len(t.Instances)))
	s.log.Debug("routing table loaded", "routes", len(t.Instances))
	return nil
}

// Run watches the table file until ctx ends. A bad file is reported once
// per version of it; the last good table keeps serving.
func (s *Server) Run(ctx context.Context) error {
	t := time.NewTicker(s.cfg.Poll)
	defer t.Stop()
	for {
		if err := s.Reload(); err != nil {
			s.log.Warn("routing table not loaded", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Handler serves the data plane, /dataplane/health and /dataplane/metrics,
// and proxies everything else to the agent.
func (s *Server) Handler() http.Handler {
	own := http.NewServeMux()
	own.HandleFunc("GET /dataplane/health", s.handleHealth)
	own.Handle("GET /dataplane/metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{Registry: s.reg}))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if id := r.Header.Get(HeaderInstance); id != "" {
			if !s.tokenOK(r.Header.Get(HeaderToken)) {
				httpjson.Write(w, 401, httpjson.Error("unauthorized", "bad or missing X-Zeitwork-Token"))
				return
			}
			s.serveInstance(w, r, id)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/dataplane/") {
			own.ServeHTTP(w, r)
			return
		}
		s.agent.ServeHTTP(w, r)
	})
}

// ControlHandler serves the control socket: GET /ping answers the same
// document as /dataplane/health.
func (s *Server) ControlHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ping", s.handleHealth)
	return mux
}

// Health is the data plane's liveness document.
func (s *Server) Health() map[string]any {
	t := s.table.Load()
	doc := map[string]any{"status": "alive", "service": "zeitwork-dataplane", "routes": len(t.Instances),
		"uptime_seconds": int(time.Since(s.started).Seconds())}
	if !t.WrittenAt.IsZero() {
		doc["table_written_at"] = t.WrittenAt
	}
	for k, v := range s.cfg.Info {
		doc[k] = v
	}
	return doc
}

func (s *Server) handleHealth(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	httpjson.Write(w, 200, s.Health())
}

func (s *Server) tokenOK(got string) bool {
	if s.cfg.Token == "" {
		return true
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(s.cfg.Token)) == 1
}

// serveInstance forwards a request to instance id's VM.
func (s *Server) serveInstance(w http.ResponseWriter, r *http.Request, id string) {
	rt, ok := s.table.Load().Instances[id]
	if !ok {
		httpjson.Write(w, 404, httpjson.Error("not_found", "no such instance on this node"))
		return
	}
	if rt.State != StateRunning || rt.Addr == "" {
		w.Header().Set("Retry-After", "1")
		httpjson.Write(w, 503, httpjson.Error("unavailable", "instance is "+rt.State))
		return
	}
	target := &url.URL{Scheme: "http", Host: rt.Addr}
	s.vm.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), targetKey{}, target)))
}

type targetKey struct{}

// newVMProxy is the reverse proxy to the VMs, shared by all requests: one
// transport keeps connections to each VM alive; responses stream
// (FlushInterval -1) and upgraded connections pass through.
func (s *Server) newVMProxy() *httputil.ReverseProxy {
	s.vmTransport = &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
	}
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(pr.In.Context().Value(targetKey{}).(*url.URL))
			pr.Out.Host = pr.In.Host
			pr.Out.Header.Del(HeaderInstance)
			pr.Out.Header.Del(HeaderToken)
			// Edge proxies set X-Forwarded-*; keep them as they are.
			for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
				if v, ok := pr.In.Header[h]; ok {
					pr.Out.Header[h] = v
				}
			}
		},
		Transport:     s.vmTransport,
		FlushInterval: -1,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.proxied.WithLabelValues("error").Inc()
			httpjson.Write(w, 502, httpjson.Error("bad_gateway", "instance did not answer: "+err.Error()))
		},
		ModifyResponse: func(resp *http.Response) error {
			s.proxied.WithLabelValues(fmt.Sprintf("%dxx", resp.StatusCode/100)).Inc()
			return nil
		},
	}
}

// newAgentProxy forwards the agent's API, health and metrics over its Unix
// socket; while nothing answers there the caller gets 503
// agent_unavailable.
func (s *Server) newAgentProxy() *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(&url.URL{Scheme: "http", Host: "agent"})
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", s.cfg.AgentSocket)
			},
			MaxIdleConns:    64,
			IdleConnTimeout: 30 * time.Second,
		},
		FlushInterval: -1,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() != nil {
				return // the caller left
			}
			w.Header().Set("Retry-After", "2")
			httpjson.Write(w, 503, httpjson.Error("agent_unavailable", "the node agent is not answering (VM traffic is unaffected): "+err.Error()))
		},
	}
}
