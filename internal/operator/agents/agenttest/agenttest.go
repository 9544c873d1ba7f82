// Package agenttest is an in-process node agent for operator tests: it
// serves the node agent API on loopback (checking the cluster token),
// heartbeats to an operator like the real agent, and simulates instances
// that turn healthy at once, or never when their image is marked bad.
package agenttest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/zeitwork/zeitwork/internal/operator/agents"
)

// Agent is one fake node.
type Agent struct {
	ID, Region string
	srv        *httptest.Server
	operator   string
	token      string
	bad        func(image string) bool
	alive      atomic.Bool

	mu      sync.Mutex
	insts   map[string]*agents.Instance
	creates map[string]int
}

// Start serves a node of region that reports to the operator at
// operatorURL; instances of images for which bad returns true never pass
// their health check.
func Start(t testing.TB, region, operatorURL, clusterToken string, bad func(image string) bool) *Agent {
	a := &Agent{ID: uuid.NewString(), Region: region, operator: operatorURL, token: clusterToken, bad: bad,
		insts: map[string]*agents.Instance{}, creates: map[string]int{}}
	a.alive.Store(true)
	mux := http.NewServeMux()
	mux.HandleFunc("POST /instances", func(w http.ResponseWriter, r *http.Request) {
		var spec agents.Spec
		if err := json.NewDecoder(r.Body).Decode(&spec); err != nil || spec.ID == "" || spec.Image == "" {
			http.Error(w, `{"error":{"code":"invalid_request","message":"bad spec"}}`, http.StatusBadRequest)
			return
		}
		a.mu.Lock()
		a.creates[spec.ID]++
		if _, ok := a.insts[spec.ID]; !ok {
			a.insts[spec.ID] = &agents.Instance{ID: spec.ID, State: "running", Healthy: !a.bad(spec.Image), IP: "10.0.0.2"}
		}
		a.mu.Unlock()
		w.WriteHeader(http.StatusCreated)
	})
	mux.HandleFunc("GET /instances", func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(a.list())
	})
	mux.HandleFunc("GET /instances/{id}/logs", func(w http.ResponseWriter, r *http.Request) {
		if !a.Has(r.PathValue("id")) {
			http.Error(w, `{"error":{"code":"not_found","message":"no such instance"}}`, http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		fmt.Fprintf(w, "{\"time\":%q,\"stream\":\"stdout\",\"line\":\"hello from %s\"}\n", time.Now().UTC().Format(time.RFC3339Nano), r.PathValue("id"))
	})
	mux.HandleFunc("DELETE /instances/{id}", func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		_, ok := a.insts[r.PathValue("id")]
		delete(a.insts, r.PathValue("id"))
		a.mu.Unlock()
		if !ok {
			http.Error(w, `{"error":{"code":"not_found","message":"no such instance"}}`, http.StatusNotFound)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+clusterToken {
			http.Error(w, `{"error":{"code":"unauthorized","message":"cluster token required"}}`, http.StatusUnauthorized)
			return
		}
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(a.srv.Close)
	return a
}

// URL is the agent's base address.
func (a *Agent) URL() string { return a.srv.URL }

// SetAlive stops (false) or resumes heartbeats, as a lost or returning node.
func (a *Agent) SetAlive(v bool) { a.alive.Store(v) }

func (a *Agent) list() []agents.Instance {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := []agents.Instance{}
	for _, in := range a.insts {
		out = append(out, *in)
	}
	return out
}

// Heartbeat reports the node and all its instances to the operator once.
func (a *Agent) Heartbeat() {
	if !a.alive.Load() {
		return
	}
	b, _ := json.Marshal(map[string]any{"id": a.ID, "hostname": "h-" + a.ID[:8], "region": a.Region, "address": a.srv.URL,
		"vcpus": 16, "memory_mib": 16384, "instances": a.list()})
	req, _ := http.NewRequest("POST", a.operator+"/api/v1/internal/nodes/"+a.ID+"/heartbeat", bytes.NewReader(b))
	req.Header.Set("Authorization", "Bearer "+a.token)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
	}
}

// Forget drops an instance as if the agent had lost its state.
func (a *Agent) Forget(id string) {
	a.mu.Lock()
	delete(a.insts, id)
	a.mu.Unlock()
}

// Adopt runs an instance nobody asked for (an orphan).
func (a *Agent) Adopt(id string) {
	a.mu.Lock()
	a.insts[id] = &agents.Instance{ID: id, State: "running", Healthy: true}
	a.mu.Unlock()
}

// Has reports whether the agent runs the instance.
func (a *Agent) Has(id string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.insts[id]
	return ok
}

// CreatesOf counts the create calls for an instance id.
func (a *Agent) CreatesOf(id string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.creates[id]
}

// Count is the number of instances the agent runs.
func (a *Agent) Count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.insts)
}
