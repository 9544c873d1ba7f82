package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/zeitwork/zeitwork/internal/buildinfo"
	"github.com/zeitwork/zeitwork/internal/httpjson"
)

// Check reports whether one dependency of the service is usable. A nil
// error means healthy.
type Check func(ctx context.Context) error

// Health aggregates named checks and extra status fields into the
// /health, /health/live and /health/ready endpoints.
type Health struct {
	service  string
	started  time.Time
	mu       sync.Mutex
	checks   map[string]Check
	info     func() map[string]any
	draining bool
}

// NewHealth returns a Health for the named service.
func NewHealth(service string) *Health {
	return &Health{service: service, started: time.Now(), checks: map[string]Check{}}
}

// AddCheck registers a readiness check; a failing check turns /health and
// /health/ready into 503 with the reason.
func (h *Health) AddCheck(name string, c Check) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.checks[name] = c
}

// SetInfo registers a function whose fields are merged into /health.
func (h *Health) SetInfo(f func() map[string]any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.info = f
}

// SetDraining marks the service as draining: readiness fails so load
// balancers stop sending new work, liveness still passes.
func (h *Health) SetDraining() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.draining = true
}

// Status runs every check and returns the /health document and whether the
// service is healthy.
func (h *Health) Status(ctx context.Context) (map[string]any, bool) {
	h.mu.Lock()
	checks := make(map[string]Check, len(h.checks))
	for k, v := range h.checks {
		checks[k] = v
	}
	info, draining := h.info, h.draining
	h.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	names := make([]string, 0, len(checks))
	for n := range checks {
		names = append(names, n)
	}
	sort.Strings(names)
	results := map[string]string{}
	var reasons []string
	for _, n := range names {
		if err := checks[n](ctx); err != nil {
			results[n] = err.Error()
			reasons = append(reasons, n+": "+err.Error())
		} else {
			results[n] = "ok"
		}
	}
	doc := map[string]any{
		"service":        h.service,
		"version":        buildinfo.Version,
		"commit":         buildinfo.CommitOrUnknown(),
		"uptime_seconds": int64(time.Since(h.started).Seconds()),
		"checks":         results,
	}
	if info != nil {
		for k, v := range info() {
			doc[k] = v
		}
	}
	healthy := len(reasons) == 0 && !draining
	switch {
	case draining:
		doc["status"] = "draining"
		doc["reason"] = "shutting down"
	case healthy:
		doc["status"] = "healthy"
	default:
		doc["status"] = "unhealthy"
		doc["reason"] = reasons
	}
	return doc, healthy
}

// Register mounts /health, /health/live, /health/ready and /metrics on mux.
func (h *Health) Register(mux *http.ServeMux, reg *prometheus.Registry) {
	status := func(w http.ResponseWriter, r *http.Request) {
		doc, ok := h.Status(r.Context())
		code := http.StatusOK
		if !ok {
			code = http.StatusServiceUnavailable
		}
		httpjson.Write(w, code, doc)
	}
	mux.HandleFunc("GET /health", status)
	mux.HandleFunc("GET /health/ready", status)
	mux.HandleFunc("GET /health/live", func(w http.ResponseWriter, r *http.Request) {
		httpjson.Write(w, http.StatusOK, map[string]any{"status": "alive", "service": h.service})
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
}

// NewRegistry returns a Prometheus registry with the process and Go
// collectors and a zeitwork_<service>_build_info gauge.
func NewRegistry(metricPrefix string) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(collectors.NewGoCollector())
	bi := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: metricPrefix + "_build_info",
		Help: "Build information of this binary; always 1.",
	}, []string{"version", "commit"})
	bi.WithLabelValues(buildinfo.Version, buildinfo.CommitOrUnknown()).Set(1)
	reg.MustRegister(bi)
	return reg
}

// Serve runs srv on ln until ctx ends, then shuts it down gracefully within
// drain. It returns nil after a clean shutdown.
func Serve(ctx context.Context, srv *http.Server, ln net.Listener, drain time.Duration) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	err := srv.Shutdown(sctx)
	if errors.Is(err, context.DeadlineExceeded) {
		slog.Warn("drain timeout reached; closing remaining connections", "addr", ln.Addr().String())
		err = srv.Close()
	}
	<-errc
	return err
}

// ListenAndServe listens on addr and calls Serve.
func ListenAndServe(ctx context.Context, srv *http.Server, addr string, drain time.Duration) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %w", addr, err)
	}
	return Serve(ctx, srv, ln, drain)
}
