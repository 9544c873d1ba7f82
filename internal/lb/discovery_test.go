package lb

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"
)

// backendLog records every list the discovery sets.
type backendLog struct {
	mu    sync.Mutex
	lists [][]string
	ch    chan struct{}
}

func (b *backendLog) SetBackends(hosts []string) {
	b.mu.Lock()
	b.lists = append(b.lists, hosts)
	b.mu.Unlock()
	select {
	case b.ch <- struct{}{}:
	default:
	}
}

// waitFor waits until the latest list equals want.
func (b *backendLog) waitFor(t *testing.T, want ...string) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		b.mu.Lock()
		var last []string
		if n := len(b.lists); n > 0 {
			last = b.lists[n-1]
		}
		b.mu.Unlock()
		if slices.Equal(last, want) {
			return
		}
		select {
		case <-b.ch:
		case <-deadline:
			t.Fatalf("backends = %v, want %v", last, want)
		}
	}
}

// TestDiscoveryFollowsOperator runs discovery against an HTTP server that
// speaks the operator's internal API (ARCHITECTURE.md): the region's edges
// plus the static list become the backends; a failing operator is skipped
// for the next one; when none answers the last list is kept.
func TestDiscoveryFollowsOperator(t *testing.T) {
	var mu sync.Mutex
	edges := []edge{
		{ID: "e1", Region: "eu", HTTPSAddress: "10.0.0.2:443", HTTPAddress: "10.0.0.2:8083"},
		{ID: "e2", Region: "eu", HTTPSAddress: "10.0.0.1:443", HTTPAddress: "10.0.0.1:8083"},
		{ID: "e3", Region: "us", HTTPSAddress: "10.9.9.9:443", HTTPAddress: "10.9.9.9:8083"},
	}
	down := false
	op := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer s3cret" {
			http.Error(w, `{"error":{"code":"unauthorized","message":"bad token"}}`, http.StatusUnauthorized)
			return
		}
		if down || r.Method != http.MethodGet || r.URL.Path != "/api/v1/internal/edges" {
			http.Error(w, `{"error":{"code":"unavailable","message":"down"}}`, http.StatusServiceUnavailable)
			return
		}
		var out []edge
		for _, e := range edges {
			if e.Region == r.URL.Query().Get("region") {
				out = append(out, e)
			}
		}
		_ = json.NewEncoder(w).Encode(out)
	}))
	defer op.Close()
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close() // refuses connections: the first operator is unreachable
	opURL, _ := url.Parse(op.URL)
	deadURL, _ := url.Parse(dead.URL)

	d := &Discovery{Operators: []*url.URL{deadURL, opURL}, Region: "eu", Token: "s3cret", Interval: 20 * time.Millisecond, Static: []string{"10.0.0.5"}}
	got := &backendLog{ch: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, got, nil) }()
	got.waitFor(t, "10.0.0.1", "10.0.0.2", "10.0.0.5")

	// The operator fails: the last list stays.
	mu.Lock()
	down = true
	mu.Unlock()
	time.Sleep(100 * time.Millisecond) // several failed rounds
	got.waitFor(t, "10.0.0.1", "10.0.0.2", "10.0.0.5")

	// It comes back with one edge fewer.
	mu.Lock()
	down = false
	edges = edges[1:]
	mu.Unlock()
	got.waitFor(t, "10.0.0.1", "10.0.0.5")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// A wrong token is an error, not an empty list.
	d.Token = "wrong"
	if hosts, err := d.Fetch(t.Context()); err == nil {
		t.Fatalf("Fetch with a bad token = %v, nil", hosts)
	}
}

// TestDiscoveryRefresh: a value on refresh (SIGHUP) fetches at once.
func TestDiscoveryRefresh(t *testing.T) {
	var mu sync.Mutex
	host := "10.0.0.1:443"
	op := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		_ = json.NewEncoder(w).Encode([]edge{{ID: "e", Region: "eu", HTTPSAddress: host}})
	}))
	defer op.Close()
	opURL, _ := url.Parse(op.URL)
	d := &Discovery{Operators: []*url.URL{opURL}, Region: "eu", Interval: time.Hour}
	got := &backendLog{ch: make(chan struct{}, 1)}
	refresh := make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, got, refresh) }()
	got.waitFor(t, "10.0.0.1")
	mu.Lock()
	host = "10.0.0.7:443"
	mu.Unlock()
	refresh <- struct{}{}
	got.waitFor(t, "10.0.0.7")
	cancel()
	<-done
}
