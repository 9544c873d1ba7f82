// Package agenttest is an in-process node agent for operator tests: it
// serves the node agent API on loopback (checking the cluster token),
// heartbeats to an operator like the real agent, and simulates instances
// that turn healthy at once, or never when their image is marked bad, and
// builds (internal/build) that end when the test says, or as OnBuild
// decides when they are created.
package agenttest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/zeitwork/zeitwork/internal/build"
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
	silent     atomic.Bool
	closing    chan struct{}

	mu      sync.Mutex
	insts   map[string]*agents.Instance
	creates map[string]int

	// builds, under mu
	maxBuilds    int
	builds       map[string]*fakeBuild
	buildOrder   []string // ids in creation order
	specs        []build.Spec
	buildCreates map[string]int
	peakBuilds   int
	onBuild      func(build.Spec) *BuildResult
	buildChanged chan struct{} // closed and replaced on every build change
}

// BuildResult is how a fake build ends: succeeded with Image (a
// <repository>@sha256:… reference), or failed with Error when it is set.
type BuildResult struct {
	Image     string
	Error     string
	Lines     []string // log lines written before the end
	CacheHits int
	Steps     int
}

type fakeBuild struct {
	spec   build.Spec
	status build.Status
	logs   []build.LogLine
}

// Start serves a node of region that reports to the operator at
// operatorURL; instances of images for which bad returns true never pass
// their health check.
func Start(t testing.TB, region, operatorURL, clusterToken string, bad func(image string) bool) *Agent {
	a := &Agent{ID: uuid.NewString(), Region: region, operator: operatorURL, token: clusterToken, bad: bad,
		insts: map[string]*agents.Instance{}, creates: map[string]int{},
		builds: map[string]*fakeBuild{}, buildCreates: map[string]int{}, buildChanged: make(chan struct{})}
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
	a.buildRoutes(mux)
	a.closing = make(chan struct{})
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a.silent.Load() {
			select {
			case <-r.Context().Done():
			case <-a.closing:
			}
			return
		}
		if r.Header.Get("Authorization") != "Bearer "+clusterToken {
			http.Error(w, `{"error":{"code":"unauthorized","message":"cluster token required"}}`, http.StatusUnauthorized)
			return
		}
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(a.srv.Close)
	t.Cleanup(func() { close(a.closing) }) // runs first: silent requests end
	return a
}

// URL is the agent's base address.
func (a *Agent) URL() string { return a.srv.URL }

// SetAlive stops (false) or resumes heartbeats, as a lost or returning node.
func (a *Agent) SetAlive(v bool) { a.alive.Store(v) }

// SetSilent makes the agent take requests and never answer them (true),
// as a node whose packets are dropped, or answer again (false).
func (a *Agent) SetSilent(v bool) { a.silent.Store(v) }

// IDs lists the instances the agent runs.
func (a *Agent) IDs() []string {
	var ids []string
	for _, in := range a.list() {
		ids = append(ids, in.ID)
	}
	return ids
}

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
	a.mu.Lock()
	maxBuilds := a.maxBuilds
	a.mu.Unlock()
	b, _ := json.Marshal(map[string]any{"id": a.ID, "hostname": "h-" + a.ID[:8], "region": a.Region, "address": a.srv.URL,
		"vcpus": 16, "memory_mib": 16384, "instances": a.list(), "max_builds": maxBuilds, "builds": a.BuildStatuses()})
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

func writeErr(w http.ResponseWriter, code int, class, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	b, _ := json.Marshal(map[string]any{"error": map[string]string{"code": class, "message": msg}})
	_, _ = w.Write(b)
}

// buildRoutes serves the build API of the node agent: POST /builds,
// GET /builds/{id}, GET /builds/{id}/logs?follow=1&since=N,
// POST /builds/{id}/cancel, DELETE /builds/{id}.
func (a *Agent) buildRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /builds", func(w http.ResponseWriter, r *http.Request) {
		var spec build.Spec
		if err := json.NewDecoder(r.Body).Decode(&spec); err != nil {
			writeErr(w, http.StatusBadRequest, "invalid_request", err.Error())
			return
		}
		if err := spec.Validate(); err != nil {
			writeErr(w, http.StatusBadRequest, "invalid_request", err.Error())
			return
		}
		a.mu.Lock()
		a.buildCreates[spec.ID]++
		if b, ok := a.builds[spec.ID]; ok {
			a.mu.Unlock()
			w.WriteHeader(http.StatusOK)
			_ = json.NewEncoder(w).Encode(b.status)
			return
		}
		if a.runningLocked() >= a.maxBuilds {
			a.mu.Unlock()
			writeErr(w, http.StatusTooManyRequests, "busy", fmt.Sprintf("all %d build slots are taken", a.maxBuilds))
			return
		}
		now := time.Now().UTC()
		b := &fakeBuild{spec: spec, status: build.Status{ID: spec.ID, DeploymentID: spec.DeploymentID, State: build.StateRunning,
			CreatedAt: now, StartedAt: &now}}
		a.builds[spec.ID] = b
		a.buildOrder = append(a.buildOrder, spec.ID)
		a.specs = append(a.specs, spec)
		a.peakBuilds = max(a.peakBuilds, a.runningLocked())
		b.logs = append(b.logs, build.LogLine{Seq: 1, Time: now, Stream: "zeitwork", Line: "build " + spec.ID + " started"})
		a.changedLocked()
		on := a.onBuild
		a.mu.Unlock()
		if on != nil {
			if res := on(spec); res != nil {
				a.FinishBuild(spec.ID, *res)
			}
		}
		a.mu.Lock()
		st := b.status
		a.mu.Unlock()
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(st)
	})
	mux.HandleFunc("GET /builds/{id}", func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		b, ok := a.builds[r.PathValue("id")]
		var st build.Status
		if ok {
			st = b.status
		}
		a.mu.Unlock()
		if !ok {
			writeErr(w, http.StatusNotFound, "not_found", "no such build")
			return
		}
		_ = json.NewEncoder(w).Encode(st)
	})
	mux.HandleFunc("POST /builds/{id}/cancel", func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		b, ok := a.builds[r.PathValue("id")]
		if ok && !build.Terminal(b.status.State) {
			now := time.Now().UTC()
			b.status.State, b.status.Error, b.status.FinishedAt = build.StateCanceled, "canceled", &now
			a.changedLocked()
		}
		a.mu.Unlock()
		if !ok {
			writeErr(w, http.StatusNotFound, "not_found", "no such build")
			return
		}
		w.WriteHeader(http.StatusAccepted)
	})
	mux.HandleFunc("DELETE /builds/{id}", func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		b, ok := a.builds[r.PathValue("id")]
		if ok && !build.Terminal(b.status.State) {
			a.mu.Unlock()
			writeErr(w, http.StatusConflict, "conflict", "the build is running; cancel it first")
			return
		}
		delete(a.builds, r.PathValue("id"))
		a.changedLocked()
		a.mu.Unlock()
		if !ok {
			writeErr(w, http.StatusNotFound, "not_found", "no such build")
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /builds/{id}/logs", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		since := -1
		if v := r.URL.Query().Get("since"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				writeErr(w, http.StatusBadRequest, "invalid_request", "since is not an integer")
				return
			}
			since = n
		}
		follow := r.URL.Query().Get("follow") == "1"
		w.Header().Set("Content-Type", "application/x-ndjson")
		first := true
		for {
			a.mu.Lock()
			b, ok := a.builds[id]
			if !ok {
				a.mu.Unlock()
				if first {
					writeErr(w, http.StatusNotFound, "not_found", "no such build")
				}
				return
			}
			var out []build.LogLine
			for _, l := range b.logs {
				if l.Seq > since {
					out = append(out, l)
				}
			}
			done, changed := build.Terminal(b.status.State), a.buildChanged
			a.mu.Unlock()
			first = false
			enc := json.NewEncoder(w)
			for _, l := range out {
				_ = enc.Encode(l)
				since = l.Seq
			}
			if f, ok := w.(http.Flusher); ok {
				f.Flush()
			}
			if !follow || done {
				return
			}
			select {
			case <-r.Context().Done():
				return
			case <-changed:
			}
		}
	})
}

func (a *Agent) runningLocked() int {
	n := 0
	for _, b := range a.builds {
		if !build.Terminal(b.status.State) {
			n++
		}
	}
	return n
}

func (a *Agent) changedLocked() {
	close(a.buildChanged)
	a.buildChanged = make(chan struct{})
}

// SetMaxBuilds sets the build slots the node reports (0, the default:
// it does not build).
func (a *Agent) SetMaxBuilds(n int) {
	a.mu.Lock()
	a.maxBuilds = n
	a.mu.Unlock()
}

// OnBuild sets what happens to each new build: f runs when the build is
// created and its result ends the build at once; nil (or a nil result)
// keeps it running until FinishBuild.
func (a *Agent) OnBuild(f func(build.Spec) *BuildResult) {
	a.mu.Lock()
	a.onBuild = f
	a.mu.Unlock()
}

// ErrNoBuild is returned for a build the agent does not have.
var ErrNoBuild = errors.New("no such build")

// Log appends lines to a running build's log.
func (a *Agent) Log(id string, lines ...string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	b, ok := a.builds[id]
	if !ok {
		return ErrNoBuild
	}
	for _, l := range lines {
		b.logs = append(b.logs, build.LogLine{Seq: b.logs[len(b.logs)-1].Seq + 1, Time: time.Now().UTC(), Stream: "build", Line: l})
	}
	a.changedLocked()
	return nil
}

// FinishBuild ends a running build with r (its lines logged first).
func (a *Agent) FinishBuild(id string, r BuildResult) error {
	if err := a.Log(id, r.Lines...); err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	b := a.builds[id]
	if b == nil || build.Terminal(b.status.State) {
		return fmt.Errorf("build %s is not running", id)
	}
	now := time.Now().UTC()
	b.status.FinishedAt, b.status.CacheHits, b.status.Steps = &now, r.CacheHits, r.Steps
	if r.Error != "" {
		b.status.State, b.status.Error = build.StateFailed, r.Error
	} else {
		b.status.State, b.status.Image = build.StateSucceeded, r.Image
	}
	a.changedLocked()
	return nil
}

// BuildStatuses lists the builds the agent holds (what its heartbeat
// reports).
func (a *Agent) BuildStatuses() []build.Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := []build.Status{}
	for _, id := range a.buildOrder {
		if b, ok := a.builds[id]; ok {
			out = append(out, b.status)
		}
	}
	return out
}

// BuildSpecs lists the specs of every build created on the agent, in
// creation order (deleted ones included).
func (a *Agent) BuildSpecs() []build.Spec {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]build.Spec(nil), a.specs...)
}

// ForgetBuild drops a build as if the agent had restarted (builds do not
// survive that).
func (a *Agent) ForgetBuild(id string) {
	a.mu.Lock()
	delete(a.builds, id)
	a.changedLocked()
	a.mu.Unlock()
}

// BuildState is a build's state on the agent ("" when it has none).
func (a *Agent) BuildState(id string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if b, ok := a.builds[id]; ok {
		return b.status.State
	}
	return ""
}

// RunningBuilds counts the agent's running builds.
func (a *Agent) RunningBuilds() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.runningLocked()
}

// PeakBuilds is the most builds that ever ran at once on the agent.
func (a *Agent) PeakBuilds() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.peakBuilds
}

// BuildCreatesOf counts the create calls for a build id.
func (a *Agent) BuildCreatesOf(id string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.buildCreates[id]
}
