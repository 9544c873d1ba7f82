package lb

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
)

// BackendStatus is one row of GET /backends.
type BackendStatus struct {
	Listener          string `json:"listener"`
	Addr              string `json:"address"`
	State             string `json:"state"` // up, down, draining
	ActiveConnections int64  `json:"active_connections"`
	TotalConnections  uint64 `json:"total_connections"`
	ConnectFailures   uint64 `json:"connect_failures"`
	LastError         string `json:"last_error,omitempty"`
}

// Status lists every backend of every listener.
func (l *LB) Status() []BackendStatus {
	var out []BackendStatus
	for i, p := range l.pools {
		for _, b := range p.Backends() {
			st := "up"
			switch {
			case b.draining.Load():
				st = "draining"
			case !b.healthy.Load():
				st = "down"
			}
			b.mu.Lock()
			last := b.lastErr
			b.mu.Unlock()
			out = append(out, BackendStatus{
				Listener: l.cfg.Listeners[i].Addr, Addr: b.Addr, State: st,
				ActiveConnections: b.active.Load(), TotalConnections: b.total.Load(),
				ConnectFailures: b.failures.Load(), LastError: last,
			})
		}
	}
	return out
}

// HealthInfo is merged into /health: type, algorithm, healthy/total.
func (l *LB) HealthInfo() map[string]any {
	healthy, total := 0, 0
	for _, p := range l.pools {
		healthy += p.Healthy()
		total += len(p.Backends())
	}
	return map[string]any{"type": "l4-tcp", "algorithm": l.cfg.Algorithm, "healthy_backends": healthy, "total_backends": total, "proxy_protocol": l.cfg.ProxyProtocol, "relay_loops": len(l.loops), "open_connections": l.open.Load()}
}

// Ready is the balancer's readiness check (service.Health.AddCheck): it
// fails while a listener has no usable edge — all down or drained — so
// that GeoDNS, which checks /health/ready, stops answering with a region
// whose balancer can reach none of its edges.
func (l *LB) Ready(context.Context) error {
	for i, p := range l.pools {
		if p.Healthy() == 0 {
			return fmt.Errorf("listener %s: none of %d edges is up", l.cfg.Listeners[i].Addr, len(p.Backends()))
		}
	}
	return nil
}

// Register mounts the admin API on mux: GET /backends, POST
// /backends/{addr}/drain and /backends/{addr}/enable.
func (l *LB) Register(mux *http.ServeMux) {
	mux.HandleFunc("GET /backends", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"backends": l.Status()})
	})
	for _, action := range []string{"drain", "enable"} {
		mux.HandleFunc("POST /backends/{addr}/"+action, func(w http.ResponseWriter, r *http.Request) {
			addr := r.PathValue("addr")
			w.Header().Set("Content-Type", "application/json")
			if n := l.Drain(addr, action == "drain"); n == 0 {
				w.WriteHeader(http.StatusNotFound)
				_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"code": "not_found", "message": "no backend " + addr}})
				return
			}
			_ = json.NewEncoder(w).Encode(map[string]any{"backends": l.Status()})
		})
	}
}
