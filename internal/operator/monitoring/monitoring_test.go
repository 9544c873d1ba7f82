package monitoring

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/embeddedpg"
	"github.com/zeitwork/zeitwork/internal/metricstest"
	"github.com/zeitwork/zeitwork/internal/observability"
	"github.com/zeitwork/zeitwork/internal/pgtest"
)

// gather collects c: name{labels} → value.
func gather(t *testing.T, c prometheus.Collector) map[string]float64 {
	return metricstest.Gather(t, c)
}

type seed struct {
	pool *pgxpool.Pool
	t    *testing.T
}

func (s seed) exec(q string, args ...any) {
	s.t.Helper()
	if _, err := s.pool.Exec(context.Background(), q, args...); err != nil {
		s.t.Fatalf("%s: %v", q, err)
	}
}

func (s seed) region(name string) uuid.UUID {
	id := uuid.New()
	s.exec(`INSERT INTO regions (id, name) VALUES ($1, $2)`, id, name)
	return id
}

func (s seed) node(region uuid.UUID, host, addr, state string, age time.Duration) uuid.UUID {
	id := uuid.New()
	s.exec(`INSERT INTO nodes (id, region_id, hostname, address, state, vcpus, memory_mib, last_heartbeat_at)
	        VALUES ($1, $2, $3, $4, $5, 8, 4096, now() - $6::interval)`, id, region, host, addr, state, fmt.Sprintf("%d seconds", int(age.Seconds())))
	return id
}

// TestCollector seeds a cluster of two regions and checks every cluster
// and deployment gauge: node states, heartbeat ages, capacity, instance
// health, live deployments with a series for every region (0 where they
// have nothing), and the minimum of active ones only.
func TestCollector(t *testing.T) {
	pool := pgtest.Pool(t)
	s := seed{pool, t}
	east, west := s.region("us-east"), s.region("eu-west")
	n1 := s.node(east, "w1", "http://10.0.0.1:8081", "ready", 2*time.Second)
	n2 := s.node(east, "w2", "http://10.0.0.2:8081", "draining", 3*time.Second)
	n3 := s.node(west, "w3", "http://10.1.0.1:8081", "down", 120*time.Second)
	org := uuid.New()
	s.exec(`INSERT INTO organisations (id, name) VALUES ($1, 'acme')`, org)
	proj := uuid.New()
	s.exec(`INSERT INTO projects (id, organisation_id, name, min_instances_per_region) VALUES ($1, $2, 'web', 2)`, proj, org)
	dep := func(status string) uuid.UUID {
		id := uuid.New()
		s.exec(`INSERT INTO deployments (id, project_id, organisation_id, status, hostname, image_ref) VALUES ($1, $2, $3, $4, $5, 'img')`,
			id, proj, org, status, id.String()+".zeitwork.test")
		return id
	}
	active, rolling, failed := dep("active"), dep("starting"), dep("failed")
	inst := func(d, node, region uuid.UUID, state string, healthy bool, desired string) {
		s.exec(`INSERT INTO instances (id, deployment_id, node_id, region_id, state, healthy, desired_state, vcpus, memory_mib, restarts)
		        VALUES ($1, $2, $3, $4, $5, $6, $7, 1, 128, 2)`, uuid.New(), d, node, region, state, healthy, desired)
	}
	inst(active, n1, east, "running", true, "running")
	inst(active, n2, east, "running", false, "running")
	inst(rolling, n1, east, "starting", false, "running")
	inst(failed, n3, west, "failed", false, "stopped")
	inst(active, n1, east, "stopped", false, "stopped")

	leading := true
	c := NewCollector(pool, func() bool { return leading }, nil)
	got := gather(t, c)
	a, r := active.String(), rolling.String()
	want := map[string]float64{
		"zeitwork_db_up":                                            1,
		"zeitwork_db_in_recovery":                                   0,
		"zeitwork_db_standbys":                                      0,
		"zeitwork_db_replication_lag_known":                         0, // no standby: unknown, not 0 seconds
		`zeitwork_cluster_nodes{region="us-east",state="ready"}`:    1,
		`zeitwork_cluster_nodes{region="us-east",state="draining"}`: 1,
		`zeitwork_cluster_nodes{region="us-east",state="down"}`:     0,
		`zeitwork_cluster_nodes{region="eu-west",state="down"}`:     1,
		`zeitwork_cluster_node_state{hostname="w3",node_id="` + n3.String() + `",region="eu-west",state="down"}`:                         1,
		`zeitwork_cluster_node_state{hostname="w3",node_id="` + n3.String() + `",region="eu-west",state="ready"}`:                        0,
		`zeitwork_cluster_capacity_vcpus{region="us-east"}`:                                                                              8, // ready nodes only
		`zeitwork_cluster_capacity_vcpus{region="eu-west"}`:                                                                              0,
		`zeitwork_cluster_allocated_vcpus{region="us-east"}`:                                                                             3,
		`zeitwork_cluster_allocated_memory_bytes{region="us-east"}`:                                                                      3 * 128 << 20,
		`zeitwork_cluster_instances{health="healthy",region="us-east",state="running"}`:                                                  1,
		`zeitwork_cluster_instances{health="unhealthy",region="us-east",state="running"}`:                                                1,
		`zeitwork_cluster_instances{health="unhealthy",region="us-east",state="starting"}`:                                               1,
		`zeitwork_deployment_info{deployment_id="` + a + `",organisation="acme",project="web",status="active"}`:                          1,
		`zeitwork_deployment_info{deployment_id="` + r + `",organisation="acme",project="web",status="starting"}`:                        1,
		`zeitwork_deployment_instances{deployment_id="` + a + `",health="healthy",organisation="acme",project="web",region="us-east"}`:   1,
		`zeitwork_deployment_instances{deployment_id="` + a + `",health="unhealthy",organisation="acme",project="web",region="us-east"}`: 1,
		`zeitwork_deployment_instances{deployment_id="` + a + `",health="healthy",organisation="acme",project="web",region="eu-west"}`:   0,
		`zeitwork_deployment_instances{deployment_id="` + r + `",health="unhealthy",organisation="acme",project="web",region="us-east"}`: 1,
		`zeitwork_deployment_min_instances{deployment_id="` + a + `",organisation="acme",project="web",region="us-east"}`:                2,
		`zeitwork_deployment_instance_restarts{deployment_id="` + a + `",organisation="acme",project="web",region="us-east"}`:            4,
		`zeitwork_deployment_instance_restarts{deployment_id="` + a + `",organisation="acme",project="web",region="eu-west"}`:            0,
		`zeitwork_deployment_min_instances{deployment_id="` + a + `",organisation="acme",project="web",region="eu-west"}`:                2,
		`zeitwork_operator_monitoring_errors_total{part="nodes"}`:                                                                        0,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
	if age := got[`zeitwork_cluster_node_heartbeat_age_seconds{hostname="w3",node_id="`+n3.String()+`",region="eu-west"}`]; age < 119 || age > 600 {
		t.Errorf("heartbeat age of w3 = %v", age)
	}
	for k := range got {
		if strings.Contains(k, failed.String()) {
			t.Errorf("a failed deployment is reported: %s", k)
		}
		if strings.HasPrefix(k, "zeitwork_deployment_min_instances") && strings.Contains(k, r) {
			t.Errorf("a deployment that is not active has a minimum: %s", k)
		}
		if strings.HasPrefix(k, "zeitwork_db_replication_lag_seconds") {
			t.Errorf("unknown lag reported as a value: %s", k)
		}
	}

	// A follower reports the database, not the cluster.
	leading = false
	for k := range gather(t, c) {
		if strings.HasPrefix(k, "zeitwork_cluster_") || strings.HasPrefix(k, "zeitwork_deployment_") {
			t.Errorf("a follower reports %s", k)
		}
	}

	// Database gone: up 0, lag unknown, nothing else made up.
	leading = true
	dead, err := pgxpool.New(context.Background(), "postgres://nobody@127.0.0.1:1/none?sslmode=disable&connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	defer dead.Close()
	down := gather(t, NewCollector(dead, func() bool { return true }, nil))
	if down["zeitwork_db_up"] != 0 || down["zeitwork_db_replication_lag_known"] != 0 || down[`zeitwork_operator_monitoring_errors_total{part="db"}`] != 1 {
		t.Errorf("database down: %v", down)
	}
	for k := range down {
		if strings.HasPrefix(k, "zeitwork_cluster_") || strings.HasPrefix(k, "zeitwork_deployment_") {
			t.Errorf("database down but %s reported", k)
		}
	}
}

func TestTargetsFile(t *testing.T) {
	b, err := TargetsFile([]Node{
		{ID: "a", Hostname: "w1", Region: "us-east", Address: "http://10.0.0.1:8081"},
		{ID: "b", Hostname: "w2", Region: "eu-west", Address: "https://w2.internal"},
		{ID: "c", Hostname: "w3", Region: "eu-west", Address: "not a url"},
		{ID: "d", Hostname: "w4", Region: "eu-west", Address: "http://[fd00::4]:8081"},
	})
	if err != nil {
		t.Fatal(err)
	}
	var groups []TargetGroup
	if err := json.Unmarshal(b, &groups); err != nil {
		t.Fatal(err)
	}
	if len(groups) != 3 {
		t.Fatalf("groups = %+v", groups)
	}
	if g := groups[0]; g.Targets[0] != "10.0.0.1:8081" || g.Labels["region"] != "us-east" || g.Labels["node_id"] != "a" || g.Labels["__scheme__"] != "http" {
		t.Errorf("group 0 = %+v", g)
	}
	if g := groups[1]; g.Targets[0] != "w2.internal:443" || g.Labels["__scheme__"] != "https" {
		t.Errorf("group 1 = %+v", g)
	}
	if g := groups[2]; g.Targets[0] != "[fd00::4]:8081" {
		t.Errorf("group 2 = %+v", g)
	}
	if b, _ := TargetsFile(nil); string(b) != "[]\n" {
		t.Errorf("no nodes = %q, want an empty list", b)
	}
}

// TestTargetsWrite writes the node table, rewrites the file when a node
// joins, and writes it again when it was removed.
func TestTargetsWrite(t *testing.T) {
	pool := pgtest.Pool(t)
	s := seed{pool, t}
	east := s.region("us-east")
	s.node(east, "w1", "http://10.0.0.1:8081", "ready", 0)
	path := filepath.Join(t.TempDir(), "sd", "nodes.json")
	w := &Targets{Path: path, Pool: pool}
	read := func() []TargetGroup {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var g []TargetGroup
		if err := json.Unmarshal(b, &g); err != nil {
			t.Fatal(err)
		}
		return g
	}
	ctx := context.Background()
	if err := w.Write(ctx); err != nil {
		t.Fatal(err)
	}
	if g := read(); len(g) != 1 || g[0].Targets[0] != "10.0.0.1:8081" {
		t.Fatalf("targets = %+v", g)
	}
	st1, _ := os.Stat(path)
	if err := w.Write(ctx); err != nil {
		t.Fatal(err)
	}
	if st2, _ := os.Stat(path); !os.SameFile(st1, st2) {
		t.Error("an unchanged node table rewrote the file")
	}
	down := s.node(east, "w2", "http://10.0.0.2:8081", "down", time.Hour)
	if err := w.Write(ctx); err != nil {
		t.Fatal(err)
	}
	if g := read(); len(g) != 2 {
		t.Fatalf("a down node must stay a target (up 0): %+v", g)
	}
	s.exec(`UPDATE nodes SET deleted_at = now() WHERE id = $1`, down)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := w.Write(ctx); err != nil {
		t.Fatal(err)
	}
	if g := read(); len(g) != 1 {
		t.Fatalf("after removal: %+v", g)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
}

// TestReplicationLag runs a real primary and a streaming standby made
// with pg_basebackup: the primary's superuser sees the standby and its
// lag, a role without pg_monitor sees a standby but no lag (unknown, not
// 0), and an operator pointed at the standby measures its replay lag.
func TestReplicationLag(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two PostgreSQL servers")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	primary, err := embeddedpg.Start(ctx, embeddedpg.Config{DataDir: filepath.Join(dir, "primary", "data"), Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = primary.Close() })
	standbyDir := filepath.Join(dir, "standby", "data")
	if err := observability.PostgresDir(standbyDir); err != nil {
		t.Fatal(err)
	}
	if _, err := observability.PGTool(ctx, "pg_basebackup", "-h", "127.0.0.1", "-p", strconv.Itoa(primary.Port()), "-U", "zeitwork",
		"-D", standbyDir, "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"); err != nil {
		t.Fatal(err)
	}
	standby, err := embeddedpg.Start(ctx, embeddedpg.Config{DataDir: standbyDir, Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = standby.Close() })

	ppool, err := db.Open(ctx, primary.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ppool.Close()
	// Wait until the standby streams (it shows in pg_stat_replication).
	deadline := time.Now().Add(time.Minute)
	for {
		var n int
		_ = ppool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'`).Scan(&n)
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the standby never streamed")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := ppool.Exec(ctx, `CREATE TABLE t (x int); INSERT INTO t VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	var got map[string]float64
	for { // lag columns fill in once the standby has replayed something
		got = gather(t, NewCollector(ppool, nil, nil))
		if got["zeitwork_db_replication_lag_known"] == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	lag, ok := got["zeitwork_db_replication_lag_seconds"]
	if got["zeitwork_db_standbys"] != 1 || got["zeitwork_db_replication_lag_known"] != 1 || !ok || lag < 0 || lag > 60 {
		t.Errorf("primary, superuser: %v", got)
	}
	if _, ok := got["zeitwork_db_replication_lag_bytes"]; !ok {
		t.Error("primary: no lag in bytes")
	}

	if _, err := ppool.Exec(ctx, `CREATE ROLE watcher LOGIN`); err != nil {
		t.Fatal(err)
	}
	wpool, err := pgxpool.New(ctx, strings.Replace(primary.URL("postgres"), "zeitwork@", "watcher@", 1))
	if err != nil {
		t.Fatal(err)
	}
	defer wpool.Close()
	got = gather(t, NewCollector(wpool, nil, nil))
	if got["zeitwork_db_up"] != 1 || got["zeitwork_db_standbys"] != 1 || got["zeitwork_db_replication_lag_known"] != 0 {
		t.Errorf("primary, no pg_monitor: %v", got)
	}
	if _, ok := got["zeitwork_db_replication_lag_seconds"]; ok {
		t.Error("primary, no pg_monitor: a lag without the rights to measure it")
	}
	if _, err := ppool.Exec(ctx, `GRANT pg_monitor TO watcher`); err != nil {
		t.Fatal(err)
	}
	wpool.Reset()
	if got = gather(t, NewCollector(wpool, nil, nil)); got["zeitwork_db_replication_lag_known"] != 1 {
		t.Errorf("primary, pg_monitor granted: %v", got)
	}

	spool, err := db.Open(ctx, standby.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer spool.Close()
	for {
		got = gather(t, NewCollector(spool, nil, nil))
		if got["zeitwork_db_replication_lag_known"] == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if got["zeitwork_db_in_recovery"] != 1 || got["zeitwork_db_replication_lag_known"] != 1 || got["zeitwork_db_replication_lag_seconds"] < 0 {
		t.Errorf("standby: %v", got)
	}
}
