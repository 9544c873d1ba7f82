package routes

import (
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/zeitwork/zeitwork/internal/pgtest"
)

func TestWaitAndCache(t *testing.T) {
	pool := pgtest.Pool(t)
	ctx := t.Context()
	builds := prometheus.NewCounter(prometheus.CounterOpts{Name: "builds"})
	s := New(pool, "zeitwork.test", builds)
	empty, err := s.Current(ctx)
	if err != nil || len(empty.Routes) != 0 || empty.Version == "" {
		t.Fatalf("empty table: %+v %v", empty, err)
	}
	// Unchanged: served from the cache, and an idle poll returns the same.
	again, err := s.Wait(ctx, empty.Version, 50*time.Millisecond)
	if err != nil || again.Version != empty.Version || count(builds) != 1 {
		t.Fatalf("idle poll: %+v %v, %v builds", again, err, count(builds))
	}

	got := make(chan *Table, 1)
	go func() {
		rt, _ := s.Wait(ctx, empty.Version, 30*time.Second)
		got <- rt
	}()
	// A deployment goes live, bumping the version in its transaction.
	org, proj, dep, region, node, inst := uuid.New(), uuid.New(), uuid.New(), uuid.New(), uuid.New(), uuid.New()
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{`INSERT INTO organisations (id, name) VALUES ($1, 'acme')`, []any{org}},
		{`INSERT INTO projects (id, organisation_id, name) VALUES ($1, $2, 'web')`, []any{proj, org}},
		{`INSERT INTO deployments (id, project_id, organisation_id, hostname, image_ref, status) VALUES ($1, $2, $3, 'web-abcdefg-acme.zeitwork.test', 'img', 'active')`, []any{dep, proj, org}},
		{`UPDATE projects SET active_deployment_id = $1`, []any{dep}},
		{`INSERT INTO regions (id, name) VALUES ($1, 'r1')`, []any{region}},
		{`INSERT INTO nodes (id, region_id, hostname, address, vcpus, memory_mib) VALUES ($1, $2, 'n1', 'http://127.0.0.1:8081', 4, 4096)`, []any{node, region}},
		{`INSERT INTO instances (id, deployment_id, node_id, region_id, vcpus, memory_mib, state, healthy) VALUES ($1, $2, $3, $4, 1, 128, 'running', true)`, []any{inst, dep, node, region}},
		{`SELECT bump_route_version()`, nil},
	} {
		if _, err := pool.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatalf("%s: %v", q.sql, err)
		}
	}
	s.Changed() // what the operator's LISTEN loop does on the notification
	var rt *Table
	select {
	case rt = <-got:
	case <-time.After(20 * time.Second):
		t.Fatal("long poll did not return after the change")
	}
	if rt == nil || rt.Version == empty.Version || len(rt.Routes) != 2 {
		t.Fatalf("after the change: %+v", rt)
	}
	want := map[string]string{"web-abcdefg-acme.zeitwork.test": "versioned", "web-acme.zeitwork.test": "production"}
	for _, r := range rt.Routes {
		if want[r.Host] != r.Kind || r.DeploymentID != dep || len(r.Instances) != 1 || !r.Instances[0].Healthy || r.Instances[0].Region != "r1" {
			t.Fatalf("route %+v", r)
		}
	}
	// The same content under a new counter keeps its version.
	if _, err := pool.Exec(ctx, `SELECT bump_route_version()`); err != nil {
		t.Fatal(err)
	}
	if same, err := s.Current(ctx); err != nil || same.Version != rt.Version {
		t.Fatalf("version changed without a change: %v", err)
	}
}

func count(c prometheus.Counter) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}
