// Package monitoring is what the operator tells Prometheus about the
// cluster beyond its own process: a collector that reads the cluster's
// state from PostgreSQL at scrape time (nodes, instances, live deployments,
// the database's reachability and replication lag), and a writer of the
// file_sd targets file that lets Prometheus find every node agent
// (OBSERVABILITY_SD_FILE).
//
// Cluster state (zeitwork_cluster_*, zeitwork_deployment_*) is reported by
// the leader only, so that every series exists once however many
// operators run; database health (zeitwork_db_*) is reported by every
// operator, each for its own connection pool.
package monitoring

import (
	"context"
	_ "embed"
	"log/slog"
	"sort"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/store"
)

//go:embed queries.sql
var queriesSQL string

var queries = func() map[string]string {
	q, err := store.Parse(queriesSQL)
	if err != nil {
		panic("monitoring: " + err.Error())
	}
	return q
}()

func q(name string) string {
	s, ok := queries[name]
	if !ok {
		panic("monitoring: unknown query " + name)
	}
	return s
}

// NodeStates are the states a node can be in (nodes.state).
var NodeStates = []string{"ready", "draining", "down"}

// Collector reports the cluster's state and the database's health.
type Collector struct {
	pool    *pgxpool.Pool
	leading func() bool
	log     *slog.Logger
	timeout time.Duration

	dbUp, dbPing, dbPool, dbRecovery, dbStandbys, dbLag, dbLagKnown, dbLagBytes *prometheus.Desc

	nodes, nodeState, nodeHeartbeat, capVCPUs, capMem, allocVCPUs, allocMem *prometheus.Desc
	instances, depInfo, depInstances, depMin, depRestarts                   *prometheus.Desc
	errors                                                                  *prometheus.CounterVec
}

var _ prometheus.Collector = (*Collector)(nil)

// NewCollector reports about pool; leading says whether this operator is
// the leader (only the leader reports the cluster's state).
func NewCollector(pool *pgxpool.Pool, leading func() bool, log *slog.Logger) *Collector {
	d := prometheus.NewDesc
	c := &Collector{pool: pool, leading: leading, log: log, timeout: 5 * time.Second,
		dbUp:       d("zeitwork_db_up", "1 when this operator's database answered a query during the scrape, 0 otherwise.", nil, nil),
		dbPing:     d("zeitwork_db_ping_duration_seconds", "Round trip of a trivial query to the database during the scrape.", nil, nil),
		dbPool:     d("zeitwork_db_pool_connections", "Connections of this operator's pool by state (acquired, idle, max).", []string{"state"}, nil),
		dbRecovery: d("zeitwork_db_in_recovery", "1 when the database this operator uses is a standby (in recovery).", nil, nil),
		dbStandbys: d("zeitwork_db_standbys", "Streaming standbys the primary reports in pg_stat_replication.", nil, nil),
		dbLag: d("zeitwork_db_replication_lag_seconds",
			"Replication lag: on a primary the largest replay lag of its standbys, on a standby its own replay lag. Absent when unknown (see zeitwork_db_replication_lag_known).", nil, nil),
		dbLagKnown: d("zeitwork_db_replication_lag_known",
			"1 when the replication lag could be measured; 0 when it could not (no standby visible, no pg_monitor rights, nothing replayed yet, database down).", nil, nil),
		dbLagBytes: d("zeitwork_db_replication_lag_bytes", "Bytes of WAL the slowest standby has not replayed yet (primary only, when known).", nil, nil),

		nodes:         d("zeitwork_cluster_nodes", "Worker nodes by region and state (ready, draining, down).", []string{"region", "state"}, nil),
		nodeState:     d("zeitwork_cluster_node_state", "1 for a node's current state, 0 for the others (state set).", []string{"node_id", "hostname", "region", "state"}, nil),
		nodeHeartbeat: d("zeitwork_cluster_node_heartbeat_age_seconds", "Seconds since a node's last heartbeat reached the operators.", []string{"node_id", "hostname", "region"}, nil),
		capVCPUs:      d("zeitwork_cluster_capacity_vcpus", "vCPUs ready nodes offer for instances, by region.", []string{"region"}, nil),
		capMem:        d("zeitwork_cluster_capacity_memory_bytes", "Memory ready nodes offer for instances, by region.", []string{"region"}, nil),
		allocVCPUs:    d("zeitwork_cluster_allocated_vcpus", "vCPUs given to instances that should run, by region.", []string{"region"}, nil),
		allocMem:      d("zeitwork_cluster_allocated_memory_bytes", "Memory given to instances that should run, by region.", []string{"region"}, nil),
		instances: d("zeitwork_cluster_instances", "Instances that should run, by region, state and health (healthy: running and passing its health check).",
			[]string{"region", "state", "health"}, nil),
		depInfo: d("zeitwork_deployment_info", "1 for every live deployment (rolling out, active, or superseded with instances left), with its status.",
			[]string{"deployment_id", "organisation", "project", "status"}, nil),
		depInstances: d("zeitwork_deployment_instances", "Instances (microVMs) of a live deployment that should run, by region and health.",
			[]string{"deployment_id", "organisation", "project", "region", "health"}, nil),
		depRestarts: d("zeitwork_deployment_instance_restarts", "Restarts (crashes, failed health checks) of a live deployment's current instances, by region.",
			[]string{"deployment_id", "organisation", "project", "region"}, nil),
		depMin: d("zeitwork_deployment_min_instances", "Healthy instances an active deployment should have in each region with nodes (min_instances_per_region).",
			[]string{"deployment_id", "organisation", "project", "region"}, nil),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_operator_monitoring_errors_total",
			Help: "Scrape-time queries of the cluster's state that failed, by part (db, nodes, instances, deployments, replication)."}, []string{"part"}),
	}
	for _, p := range []string{"db", "nodes", "instances", "deployments", "replication"} {
		c.errors.WithLabelValues(p)
	}
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.dbUp, c.dbPing, c.dbPool, c.dbRecovery, c.dbStandbys, c.dbLag, c.dbLagKnown, c.dbLagBytes,
		c.nodes, c.nodeState, c.nodeHeartbeat, c.capVCPUs, c.capMem, c.allocVCPUs, c.allocMem,
		c.instances, c.depInfo, c.depInstances, c.depMin, c.depRestarts} {
		ch <- d
	}
	c.errors.Describe(ch)
}

// Collect implements prometheus.Collector. Every query shares one
// deadline; a part that fails is left out of the scrape (and counted),
// never reported as zeros.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	defer c.errors.Collect(ch)
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	st := c.pool.Stat()
	gauge(c.dbPool, float64(st.AcquiredConns()), "acquired")
	gauge(c.dbPool, float64(st.IdleConns()), "idle")
	gauge(c.dbPool, float64(st.MaxConns()), "max")

	start := time.Now()
	var recovery bool
	if err := c.pool.QueryRow(ctx, q("MonRecovery")).Scan(&recovery); err != nil {
		c.fail("db", err)
		gauge(c.dbUp, 0)
		gauge(c.dbLagKnown, 0)
		return
	}
	gauge(c.dbUp, 1)
	gauge(c.dbPing, time.Since(start).Seconds())
	gauge(c.dbRecovery, b2f(recovery))
	c.collectLag(ctx, recovery, gauge)
	if c.leading != nil && !c.leading() {
		return
	}
	c.collectNodes(ctx, gauge)
	c.collectInstances(ctx, gauge)
	c.collectDeployments(ctx, gauge)
}

func (c *Collector) fail(part string, err error) {
	c.errors.WithLabelValues(part).Inc()
	if c.log != nil {
		c.log.Warn("monitoring query failed", "part", part, "err", err)
	}
}

type gaugeFunc func(d *prometheus.Desc, v float64, l ...string)

func (c *Collector) collectLag(ctx context.Context, recovery bool, gauge gaugeFunc) {
	if recovery {
		var lag *float64
		if err := c.pool.QueryRow(ctx, q("MonStandbyLag")).Scan(&lag); err != nil {
			c.fail("replication", err)
			gauge(c.dbLagKnown, 0)
			return
		}
		if lag == nil {
			gauge(c.dbLagKnown, 0)
			return
		}
		gauge(c.dbLagKnown, 1)
		gauge(c.dbLag, max(*lag, 0))
		return
	}
	var standbys, hidden, lagging int64
	var lag, bytes *float64
	if err := c.pool.QueryRow(ctx, q("MonPrimaryLag")).Scan(&standbys, &hidden, &lag, &lagging, &bytes); err != nil {
		c.fail("replication", err)
		gauge(c.dbLagKnown, 0)
		return
	}
	gauge(c.dbStandbys, float64(standbys))
	if standbys == 0 || hidden > 0 || lagging > 0 || lag == nil {
		gauge(c.dbLagKnown, 0)
		return
	}
	gauge(c.dbLagKnown, 1)
	gauge(c.dbLag, max(*lag, 0))
	if bytes != nil {
		gauge(c.dbLagBytes, max(*bytes, 0))
	}
}

func (c *Collector) collectNodes(ctx context.Context, gauge gaugeFunc) {
	rows, err := c.pool.Query(ctx, q("MonNodes"))
	if err != nil {
		c.fail("nodes", err)
		return
	}
	defer rows.Close()
	type regionSums struct {
		states                                 map[string]int
		capVCPUs, capMem, allocVCPUs, allocMem float64
	}
	regions := map[string]*regionSums{}
	for rows.Next() {
		var id, host, region, state, addr string
		var age float64
		var vcpus, allocVCPUs int64
		var mem, allocMem int64
		if err := rows.Scan(&id, &host, &region, &state, &addr, &age, &vcpus, &mem, &allocVCPUs, &allocMem); err != nil {
			c.fail("nodes", err)
			return
		}
		r := regions[region]
		if r == nil {
			r = &regionSums{states: map[string]int{}}
			regions[region] = r
		}
		r.states[state]++
		for _, s := range NodeStates {
			gauge(c.nodeState, b2f(s == state), id, host, region, s)
		}
		gauge(c.nodeHeartbeat, max(age, 0), id, host, region)
		if state == "ready" {
			r.capVCPUs += float64(vcpus)
			r.capMem += float64(mem)
		}
		r.allocVCPUs += float64(allocVCPUs)
		r.allocMem += float64(allocMem)
	}
	if err := rows.Err(); err != nil {
		c.fail("nodes", err)
		return
	}
	for name, r := range regions {
		for _, s := range NodeStates {
			gauge(c.nodes, float64(r.states[s]), name, s)
		}
		gauge(c.capVCPUs, r.capVCPUs, name)
		gauge(c.capMem, r.capMem, name)
		gauge(c.allocVCPUs, r.allocVCPUs, name)
		gauge(c.allocMem, r.allocMem, name)
	}
}

func (c *Collector) collectInstances(ctx context.Context, gauge gaugeFunc) {
	rows, err := c.pool.Query(ctx, q("MonInstances"))
	if err != nil {
		c.fail("instances", err)
		return
	}
	defer rows.Close()
	for rows.Next() {
		var region, state string
		var healthy bool
		var n int64
		if err := rows.Scan(&region, &state, &healthy, &n); err != nil {
			c.fail("instances", err)
			return
		}
		gauge(c.instances, float64(n), region, state, health(healthy))
	}
	if err := rows.Err(); err != nil {
		c.fail("instances", err)
	}
}

type deployment struct {
	id, org, project, status string
	min                      int
}

func (c *Collector) collectDeployments(ctx context.Context, gauge gaugeFunc) {
	deps := map[string]deployment{}
	rows, err := c.pool.Query(ctx, q("MonDeployments"))
	if err != nil {
		c.fail("deployments", err)
		return
	}
	for rows.Next() {
		var d deployment
		if err := rows.Scan(&d.id, &d.org, &d.project, &d.status, &d.min); err != nil {
			rows.Close()
			c.fail("deployments", err)
			return
		}
		deps[d.id] = d
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		c.fail("deployments", err)
		return
	}
	var regions []string
	rows, err = c.pool.Query(ctx, q("MonRegions"))
	if err != nil {
		c.fail("deployments", err)
		return
	}
	for rows.Next() {
		var r string
		if err := rows.Scan(&r); err != nil {
			rows.Close()
			c.fail("deployments", err)
			return
		}
		regions = append(regions, r)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		c.fail("deployments", err)
		return
	}
	counts := map[string]map[string][3]int64{} // deployment id → region → healthy, unhealthy, restarts
	rows, err = c.pool.Query(ctx, q("MonDeploymentInstances"))
	if err != nil {
		c.fail("deployments", err)
		return
	}
	for rows.Next() {
		var id, region string
		var n [3]int64
		if err := rows.Scan(&id, &region, &n[0], &n[1], &n[2]); err != nil {
			rows.Close()
			c.fail("deployments", err)
			return
		}
		if counts[id] == nil {
			counts[id] = map[string][3]int64{}
		}
		counts[id][region] = n
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		c.fail("deployments", err)
		return
	}
	ids := make([]string, 0, len(deps))
	for id := range deps {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		d := deps[id]
		gauge(c.depInfo, 1, d.id, d.org, d.project, d.status)
		// Every region with nodes gets a series (0 when the deployment
		// has nothing there), so "below the minimum" sees empty regions.
		seen := map[string]bool{}
		for _, r := range regions {
			seen[r] = true
			n := counts[id][r]
			gauge(c.depInstances, float64(n[0]), d.id, d.org, d.project, r, "healthy")
			gauge(c.depInstances, float64(n[1]), d.id, d.org, d.project, r, "unhealthy")
			gauge(c.depRestarts, float64(n[2]), d.id, d.org, d.project, r)
			if d.status == "active" {
				gauge(c.depMin, float64(d.min), d.id, d.org, d.project, r)
			}
		}
		for r, n := range counts[id] { // instances in a region without nodes left
			if !seen[r] {
				gauge(c.depInstances, float64(n[0]), d.id, d.org, d.project, r, "healthy")
				gauge(c.depInstances, float64(n[1]), d.id, d.org, d.project, r, "unhealthy")
				gauge(c.depRestarts, float64(n[2]), d.id, d.org, d.project, r)
			}
		}
	}
}

func health(ok bool) string {
	if ok {
		return "healthy"
	}
	return "unhealthy"
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
