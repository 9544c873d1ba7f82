// Package builds queues and schedules builds from source (docs/adr/0600)
// on the leader operator. A deployment of a project without an image
// template records a queued build in the same transaction; each Pass then
// cancels builds nobody waits for, lets a newer queued build of a project
// and branch replace older queued ones, follows running builds through
// their nodes' heartbeats (or GET /builds/{id}), turns a finished build
// into the deployment's image (or its failure), cleans builds off the
// nodes, and assigns queued builds to free build slots, fairly between
// organisations and near the project's layer cache. Like the deployment
// reconciler it is level-triggered: every step is decided again from
// PostgreSQL and the nodes' reports on the next pass.
package builds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/operator/agents"
	"github.com/zeitwork/zeitwork/internal/operator/secrets"
	"github.com/zeitwork/zeitwork/internal/store"
)

// Config is the build part of the operator configuration.
type Config struct {
	Registry      string        // BUILD_REGISTRY: host[:port][/path] images are pushed to
	Timeout       time.Duration // BUILD_TIMEOUT: wall-clock limit of one build
	VCPUs         int           // BUILD_VCPUS (0: the agent's default)
	MemoryMiB     int           // BUILD_MEMORY_MIB (0: the agent's default)
	DiskMiB       int           // BUILD_DISK_MIB (0: the agent's default)
	DeployTimeout time.Duration // a built deployment's fresh deadline to turn healthy
	SourceGrace   time.Duration // uploads no build uses are deleted after it
}

// Grace is how long a running build may stay without a result past its
// deadline before it fails.
const Grace = 2 * time.Minute

// Metrics are the scheduler's Prometheus metrics.
type Metrics struct {
	Results     *prometheus.CounterVec // zeitwork_builds_total{result}
	Duration    prometheus.Histogram   // zeitwork_build_duration_seconds
	Queued      prometheus.Gauge       // zeitwork_builds_queued
	Transitions *prometheus.CounterVec // deployment transitions by status (the operator's)
}

// NewMetrics makes the scheduler's own metrics around the operator's
// deployment transitions counter.
func NewMetrics(transitions *prometheus.CounterVec) *Metrics {
	return &Metrics{
		Results: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_builds_total",
			Help: "Builds that ended, by result (succeeded, failed, canceled)."}, []string{"result"}),
		Duration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "zeitwork_build_duration_seconds",
			Help: "Wall-clock time of builds from start on a node to their end.", Buckets: prometheus.ExponentialBuckets(5, 2, 10)}),
		Queued:      prometheus.NewGauge(prometheus.GaugeOpts{Name: "zeitwork_builds_queued", Help: "Builds waiting for a build slot."}),
		Transitions: transitions,
	}
}

// Collectors lists the metrics to register.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.Results, m.Duration, m.Queued}
}

// Scheduler runs passes; like the reconciler it is owned by the leader
// loop and not safe for concurrent passes.
type Scheduler struct {
	cfg    Config
	pool   *pgxpool.Pool
	agents *agents.Client
	seal   *secrets.Sealer
	log    *slog.Logger
	m      *Metrics
}

// New builds a scheduler.
func New(cfg Config, pool *pgxpool.Pool, ag *agents.Client, seal *secrets.Sealer, log *slog.Logger, m *Metrics) *Scheduler {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 15 * time.Minute
	}
	if cfg.SourceGrace <= 0 {
		cfg.SourceGrace = time.Hour
	}
	return &Scheduler{cfg: cfg, pool: pool, agents: ag, seal: seal, log: log, m: m}
}

// Q is the named query from internal/store.
func Q(name string) string { return store.Q(name) }

// node is a node as the scheduler sees it in one pass.
type node struct {
	id                 uuid.UUID
	hostname, address  string
	state              string
	maxBuilds          int
	reported           map[string]build.Status // its last heartbeat's builds
	running, agentBusy int                     // running builds by the database and by the node
}

func (n *node) name() string {
	if n.hostname != "" {
		return n.hostname
	}
	return n.id.String()
}

func (n *node) free() int {
	if n.state != "ready" {
		return 0
	}
	return n.maxBuilds - max(n.running, n.agentBusy)
}

// openBuild is a running build row.
type openBuild struct {
	id, deployment uuid.UUID
	nodeID         *uuid.UUID
	accepted       bool // its node acknowledged it
	startedAt      *time.Time
	pastDue        bool
}

// Pass is one pass over every open build.
func (s *Scheduler) Pass(ctx context.Context) error {
	if err := s.cancelUnwanted(ctx); err != nil {
		return fmt.Errorf("cannot cancel builds of closed deployments: %w", err)
	}
	if err := s.supersede(ctx); err != nil {
		return fmt.Errorf("cannot supersede queued builds: %w", err)
	}
	nodes, err := s.nodes(ctx)
	if err != nil {
		return fmt.Errorf("cannot read nodes: %w", err)
	}
	var errs []error
	if err := s.watch(ctx, nodes); err != nil {
		errs = append(errs, err)
	}
	if err := s.collect(ctx, nodes); err != nil {
		errs = append(errs, err)
	}
	if err := s.assign(ctx, nodes); err != nil {
		errs = append(errs, err)
	}
	if _, err := s.pool.Exec(ctx, Q("SourcesExpired"), store.Interval(s.cfg.SourceGrace)); err != nil {
		errs = append(errs, fmt.Errorf("cannot delete unused sources: %w", err))
	}
	var queued int
	if err := s.pool.QueryRow(ctx, Q("BuildsQueuedCount")).Scan(&queued); err != nil {
		errs = append(errs, err)
	}
	s.m.Queued.Set(float64(queued))
	return errors.Join(errs...)
}

// cancelUnwanted cancels open builds whose deployment stopped waiting for
// them (stopped, project deleted, …) and tells their nodes.
func (s *Scheduler) cancelUnwanted(ctx context.Context) error {
	rows, err := s.pool.Query(ctx, Q("BuildsOfClosedDeployments"))
	if err != nil {
		return err
	}
	type closed struct {
		id     uuid.UUID
		source *uuid.UUID
		addr   string
	}
	list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (closed, error) {
		var c closed
		return c, row.Scan(&c.id, &c.source, &c.addr)
	})
	if err != nil {
		return err
	}
	for _, c := range list {
		s.log.Info("build canceled: its deployment no longer waits for it", "build_id", c.id)
		s.m.Results.WithLabelValues(build.StateCanceled).Inc()
		if c.source != nil {
			if _, err := s.pool.Exec(ctx, Q("SourceDelete"), *c.source); err != nil {
				return err
			}
		}
		if c.addr != "" {
			s.cancel(ctx, c.addr, c.id)
		}
	}
	return nil
}

// supersede cancels queued builds for which a newer build of the same
// project and branch is queued; their deployments end superseded.
func (s *Scheduler) supersede(ctx context.Context) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, Q("BuildsSupersedeQueued"))
		if err != nil {
			return err
		}
		type replaced struct {
			id, deployment      uuid.UUID
			source              *uuid.UUID
			branch, sha, srcSHA string
			newerDeployment     uuid.UUID
		}
		list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (replaced, error) {
			var r replaced
			return r, row.Scan(&r.id, &r.deployment, &r.source, &r.branch, &r.sha, &r.srcSHA, &r.newerDeployment)
		})
		if err != nil {
			return err
		}
		for _, r := range list {
			what := "commit " + r.sha
			if r.sha == "" {
				what = "source archive " + Tag("", r.srcSHA)
			}
			of := "this project"
			if r.branch != "" {
				of = "branch " + r.branch
			}
			reason := fmt.Sprintf("superseded before its build started by a newer build of %s (%s, deployment %s)", of, what, r.newerDeployment)
			tag, err := tx.Exec(ctx, Q("DeploymentSupersededByBuild"), r.deployment, reason)
			if err != nil {
				return err
			}
			if tag.RowsAffected() > 0 {
				s.m.Transitions.WithLabelValues("superseded").Inc()
			}
			if r.source != nil {
				if _, err := tx.Exec(ctx, Q("SourceDelete"), *r.source); err != nil {
					return err
				}
			}
			s.m.Results.WithLabelValues(build.StateCanceled).Inc()
			s.log.Info("queued build superseded", "build_id", r.id, "deployment_id", r.deployment, "by_deployment_id", r.newerDeployment)
		}
		return nil
	})
}

func (s *Scheduler) nodes(ctx context.Context) (map[uuid.UUID]*node, error) {
	rows, err := s.pool.Query(ctx, Q("BuildNodes"))
	if err != nil {
		return nil, err
	}
	list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (*node, error) {
		n := &node{reported: map[string]build.Status{}}
		var raw []byte
		if err := row.Scan(&n.id, &n.hostname, &n.address, &n.state, &n.maxBuilds, &raw); err != nil {
			return nil, err
		}
		var reported []build.Status
		_ = json.Unmarshal(raw, &reported) // the heartbeat handler stored valid JSON
		for _, st := range reported {
			if st.ID == "" {
				continue
			}
			n.reported[st.ID] = st
			if !build.Terminal(st.State) {
				n.agentBusy++
			}
		}
		return n, nil
	})
	if err != nil {
		return nil, err
	}
	out := map[uuid.UUID]*node{}
	for _, n := range list {
		out[n.id] = n
	}
	return out, nil
}

// watch follows every running build: a result from its node ends it; a
// lost node or a missed deadline fails it; a node that does not know it
// is sent it again.
func (s *Scheduler) watch(ctx context.Context, nodes map[uuid.UUID]*node) error {
	rows, err := s.pool.Query(ctx, Q("BuildsRunning"), store.Interval(Grace))
	if err != nil {
		return err
	}
	running, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (openBuild, error) {
		var b openBuild
		return b, row.Scan(&b.id, &b.deployment, &b.nodeID, &b.accepted, &b.startedAt, &b.pastDue)
	})
	if err != nil {
		return err
	}
	var errs []error
	for _, b := range running {
		var n *node
		if b.nodeID != nil {
			n = nodes[*b.nodeID]
		}
		if n == nil || n.state == "down" {
			where := "its node"
			if n != nil {
				where = "node " + n.name()
				s.cancel(ctx, n.address, b.id)
			}
			reason := where + " stopped answering during the build and was marked down; deploy again to rebuild"
			errs = append(errs, s.end(ctx, b, build.StateFailed, reason, nil, nil))
			continue
		}
		if b.pastDue {
			s.cancel(ctx, n.address, b.id)
			reason := fmt.Sprintf("no result from node %s within BUILD_TIMEOUT (%s) and %s of grace; the build was canceled", n.name(), s.cfg.Timeout, Grace)
			errs = append(errs, s.end(ctx, b, build.StateFailed, reason, nil, nil))
			continue
		}
		st, ok := n.reported[b.id.String()]
		if !ok {
			got, err := s.agents.GetBuild(ctx, n.address, b.id.String())
			switch {
			case agents.IsNotFound(err) && b.accepted:
				// Builds do not survive an agent restart (docs/adr/0600).
				reason := fmt.Sprintf("node %s lost the build (its node agent restarted); deploy again to rebuild", n.name())
				errs = append(errs, s.end(ctx, b, build.StateFailed, reason, nil, nil))
				continue
			case agents.IsNotFound(err):
				// The create never got through: creates are idempotent,
				// so send it again.
				n.running++
				errs = append(errs, s.resend(ctx, b, n))
				continue
			case err != nil:
				n.running++
				s.log.Warn("cannot read build status from node", "build_id", b.id, "node_id", n.id, "err", err)
				continue
			}
			st = *got
		}
		if !build.Terminal(st.State) {
			n.running++
			continue
		}
		errs = append(errs, s.finish(ctx, b, n, st))
	}
	return errors.Join(errs...)
}

// finish turns a node's terminal status into the build's result, saving
// its log first; the node forgets the build once its log is saved.
func (s *Scheduler) finish(ctx context.Context, b openBuild, n *node, st build.Status) error {
	lg, err := s.fetchLog(ctx, n.address, b.id)
	if err != nil {
		s.log.Warn("cannot fetch build log; retrying after the build ends", "build_id", b.id, "node_id", n.id, "err", err)
	}
	state, reason := st.State, ""
	switch st.State {
	case build.StateSucceeded:
		if !strings.Contains(st.Image, "@sha256:") {
			state, reason = build.StateFailed, fmt.Sprintf("node %s reported success without an image digest (image %q)", n.name(), st.Image)
		}
	case build.StateFailed:
		reason = st.Error
		if reason == "" {
			reason = "the builder gave no cause"
		}
	case build.StateCanceled:
		state, reason = build.StateFailed, "canceled on node "+n.name()
		if st.Error != "" {
			reason += ": " + st.Error
		}
	}
	if err := s.end(ctx, b, state, reason, &st, lg); err != nil {
		return err
	}
	delete(n.reported, b.id.String())
	if lg != nil {
		if err := s.agents.DeleteBuild(ctx, n.address, b.id.String()); err != nil {
			s.log.Warn("cannot delete finished build on node", "build_id", b.id, "node_id", n.id, "err", err)
		}
	}
	return nil
}

// end records a build's end and its deployment's next step in one
// transaction, with its log when there is one: succeeded → the deployment
// goes on to preparing with the pushed image; failed or canceled → it
// fails with "build failed: " and the reason. A build that already ended
// keeps its result.
func (s *Scheduler) end(ctx context.Context, b openBuild, state, reason string, st *build.Status, lg *Log) error {
	var cacheHits, steps int
	var image string
	if st != nil {
		cacheHits, steps, image = st.CacheHits, st.Steps, st.Image
	}
	ended, moved := false, ""
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		ended, moved = false, ""
		if lg != nil {
			if err := saveLog(ctx, tx, b.id, lg); err != nil {
				return err
			}
		}
		var row pgx.Row
		if state == build.StateSucceeded {
			row = tx.QueryRow(ctx, Q("BuildSucceed"), b.id, image, cacheHits, steps)
		} else {
			row = tx.QueryRow(ctx, Q("BuildEnd"), b.id, state, reason, cacheHits, steps)
		}
		var dep uuid.UUID
		var source *uuid.UUID
		if err := row.Scan(&dep, &source, &b.startedAt); errors.Is(err, pgx.ErrNoRows) {
			return nil
		} else if err != nil {
			return err
		}
		ended = true
		if source != nil {
			if _, err := tx.Exec(ctx, Q("SourceDelete"), *source); err != nil {
				return err
			}
		}
		var tag interface{ RowsAffected() int64 }
		var err error
		if state == build.StateSucceeded {
			tag, err = tx.Exec(ctx, Q("DeploymentBuilt"), dep, image, store.Interval(s.cfg.DeployTimeout))
			moved = "preparing"
		} else {
			tag, err = tx.Exec(ctx, Q("DeploymentBuildFailed"), dep, "build failed: "+reason)
			moved = "failed"
		}
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			moved = ""
		}
		_, err = tx.Exec(ctx, "SELECT pg_notify('zeitwork_reconcile', '')")
		return err
	})
	if err != nil {
		return fmt.Errorf("cannot record the end of build %s: %w", b.id, err)
	}
	if !ended {
		return nil
	}
	s.m.Results.WithLabelValues(state).Inc()
	if d, ok := duration(b.startedAt, st); ok {
		s.m.Duration.Observe(d.Seconds())
	}
	if moved != "" {
		s.m.Transitions.WithLabelValues(moved).Inc()
	}
	if state == build.StateSucceeded {
		s.log.Info("build succeeded", "build_id", b.id, "deployment_id", b.deployment, "image", image, "cache_hits", cacheHits, "steps", steps)
	} else {
		s.log.Info("build ended", "build_id", b.id, "deployment_id", b.deployment, "state", state, "reason", reason)
	}
	return nil
}

func duration(started *time.Time, st *build.Status) (time.Duration, bool) {
	if st != nil && st.StartedAt != nil && st.FinishedAt != nil {
		return st.FinishedAt.Sub(*st.StartedAt), true
	}
	if started != nil {
		return time.Since(*started), true
	}
	return 0, false
}

// fetchLog reads a build's whole log from its node; a node that no
// longer has the build yields an empty log.
func (s *Scheduler) fetchLog(ctx context.Context, addr string, id uuid.UUID) (*Log, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	body, err := s.agents.BuildLogs(ctx, addr, id.String(), false, -1)
	if agents.IsNotFound(err) {
		return &Log{}, nil
	}
	if err != nil {
		return nil, err
	}
	defer body.Close()
	return ReadLog(body)
}

func saveLog(ctx context.Context, tx pgx.Tx, id uuid.UUID, lg *Log) error {
	lines := lg.Lines()
	seqs := make([]int32, len(lines))
	times := make([]time.Time, len(lines))
	streams := make([]string, len(lines))
	texts := make([]string, len(lines))
	now := time.Now().UTC()
	for i, l := range lines {
		seqs[i] = int32(min(max(l.Seq, 0), math.MaxInt32))
		times[i], streams[i], texts[i] = l.Time, l.Stream, l.Line
		if l.Time.IsZero() {
			times[i] = now
		}
	}
	if _, err := tx.Exec(ctx, Q("BuildLogsInsert"), id, seqs, times, streams, texts); err != nil {
		return err
	}
	_, err := tx.Exec(ctx, Q("BuildLogSaved"), id, lg.Truncated())
	return err
}

// cancel asks a node to stop a build, best effort: a build the database
// ended is cancelled again when its node reports it.
func (s *Scheduler) cancel(ctx context.Context, addr string, id uuid.UUID) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := s.agents.CancelBuild(ctx, addr, id.String()); err != nil {
		s.log.Warn("cannot cancel build on node", "build_id", id, "node", addr, "err", err)
	}
}

// collect cleans builds off the nodes once the database has ended them:
// still running there → cancel; finished there → save the log if it is
// not saved yet, then delete. Builds the database does not know go too.
func (s *Scheduler) collect(ctx context.Context, nodes map[uuid.UUID]*node) error {
	var errs []error
	for _, n := range nodes {
		if n.state == "down" || len(n.reported) == 0 {
			continue
		}
		var ids []uuid.UUID
		for id := range n.reported {
			if u, err := uuid.Parse(id); err == nil {
				ids = append(ids, u)
			}
		}
		rows, err := s.pool.Query(ctx, Q("BuildsKnown"), ids)
		if err != nil {
			return err
		}
		type known struct {
			state    string
			logSaved bool
		}
		db := map[string]known{}
		var id uuid.UUID
		var k known
		if _, err := pgx.ForEachRow(rows, []any{&id, &k.state, &k.logSaved}, func() error {
			db[id.String()] = k
			return nil
		}); err != nil {
			return err
		}
		for id, st := range n.reported {
			k, ok := db[id]
			if ok && !build.Terminal(k.state) {
				continue // watched
			}
			if !build.Terminal(st.State) {
				s.log.Info("canceling a build the database has ended or does not know", "build_id", id, "node_id", n.id)
				s.cancelID(ctx, n.address, id)
				continue
			}
			if ok && !k.logSaved {
				bid, _ := uuid.Parse(id)
				lg, err := s.fetchLog(ctx, n.address, bid)
				if err != nil {
					s.log.Warn("cannot fetch build log", "build_id", id, "node_id", n.id, "err", err)
					continue
				}
				if err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return saveLog(ctx, tx, bid, lg) }); err != nil {
					errs = append(errs, fmt.Errorf("cannot save the log of build %s: %w", id, err))
					continue
				}
			}
			if err := s.agents.DeleteBuild(ctx, n.address, id); err != nil {
				s.log.Warn("cannot delete build on node", "build_id", id, "node_id", n.id, "err", err)
			}
		}
	}
	return errors.Join(errs...)
}

func (s *Scheduler) cancelID(ctx context.Context, addr, id string) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := s.agents.CancelBuild(ctx, addr, id); err != nil {
		s.log.Warn("cannot cancel build on node", "build_id", id, "node", addr, "err", err)
	}
}

type queuedBuild struct {
	id, org, project uuid.UUID
	order            int
}

// assign hands queued builds to free build slots: repeatedly the oldest
// queued build of the organisation with the fewest running builds (ties:
// the organisation served longest ago), on the node of the project's last
// successful build when it has a free slot (its layer cache is there),
// else on the ready node with the most free slots, in any region.
func (s *Scheduler) assign(ctx context.Context, nodes map[uuid.UUID]*node) error {
	if s.cfg.Registry == "" {
		return s.failQueued(ctx, ErrNoRegistry.Error())
	}
	free := 0
	for _, n := range nodes {
		free += max(n.free(), 0)
	}
	if free == 0 {
		return nil
	}
	rows, err := s.pool.Query(ctx, Q("BuildsQueued"))
	if err != nil {
		return err
	}
	queue, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (queuedBuild, error) {
		var q queuedBuild
		return q, row.Scan(&q.id, &q.org, &q.project)
	})
	if err != nil || len(queue) == 0 {
		return err
	}
	var orgs, projects []uuid.UUID
	for i := range queue {
		queue[i].order = i
		orgs = append(orgs, queue[i].org)
		projects = append(projects, queue[i].project)
	}
	running := map[uuid.UUID]int{}
	served := map[uuid.UUID]time.Time{}
	rows, err = s.pool.Query(ctx, Q("BuildsRunningByOrg"), orgs)
	if err != nil {
		return err
	}
	var org uuid.UUID
	var count int
	var last *time.Time
	if _, err := pgx.ForEachRow(rows, []any{&org, &count, &last}, func() error {
		running[org] = count
		if last != nil {
			served[org] = *last
		}
		return nil
	}); err != nil {
		return err
	}
	preferred := map[uuid.UUID]uuid.UUID{}
	rows, err = s.pool.Query(ctx, Q("BuildsLastNode"), projects)
	if err != nil {
		return err
	}
	var project, nodeID uuid.UUID
	if _, err := pgx.ForEachRow(rows, []any{&project, &nodeID}, func() error {
		preferred[project] = nodeID
		return nil
	}); err != nil {
		return err
	}
	var errs []error
	for len(queue) > 0 {
		sort.SliceStable(queue, func(i, j int) bool {
			a, b := queue[i], queue[j]
			if running[a.org] != running[b.org] {
				return running[a.org] < running[b.org]
			}
			if !served[a.org].Equal(served[b.org]) {
				return served[a.org].Before(served[b.org])
			}
			return a.order < b.order
		})
		q := queue[0]
		n := pickNode(nodes, preferred[q.project])
		if n == nil {
			break
		}
		queue = queue[1:]
		spec, err := s.spec(ctx, q.id)
		if err != nil {
			errs = append(errs, s.end(ctx, openBuild{id: q.id}, build.StateFailed, err.Error(), nil, nil))
			continue
		}
		tag, err := s.pool.Exec(ctx, Q("BuildStart"), q.id, n.id, spec.Image, store.Interval(s.cfg.Timeout))
		if err != nil {
			return errors.Join(append(errs, err)...)
		}
		if tag.RowsAffected() == 0 {
			continue
		}
		n.running++
		running[q.org]++
		served[q.org] = time.Now()
		s.log.Info("build assigned", "build_id", q.id, "deployment_id", spec.DeploymentID, "node_id", n.id, "image", spec.Image)
		errs = append(errs, s.send(ctx, openBuild{id: q.id}, n, spec))
	}
	return errors.Join(errs...)
}

// failQueued fails every queued build with reason.
func (s *Scheduler) failQueued(ctx context.Context, reason string) error {
	rows, err := s.pool.Query(ctx, Q("BuildsQueued"))
	if err != nil {
		return err
	}
	queue, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (queuedBuild, error) {
		var q queuedBuild
		return q, row.Scan(&q.id, &q.org, &q.project)
	})
	if err != nil {
		return err
	}
	var errs []error
	for _, q := range queue {
		errs = append(errs, s.end(ctx, openBuild{id: q.id}, build.StateFailed, reason, nil, nil))
	}
	return errors.Join(errs...)
}

// pickNode is the preferred node when it has a free slot, else the node
// with the most free slots (nil when none has one).
func pickNode(nodes map[uuid.UUID]*node, preferred uuid.UUID) *node {
	if n := nodes[preferred]; n != nil && n.free() > 0 {
		return n
	}
	var best *node
	for _, n := range nodes {
		if n.free() <= 0 {
			continue
		}
		if best == nil || n.free() > best.free() || (n.free() == best.free() && n.id.String() < best.id.String()) {
			best = n
		}
	}
	return best
}

// resend sends a running build's spec to its node again.
func (s *Scheduler) resend(ctx context.Context, b openBuild, n *node) error {
	spec, err := s.spec(ctx, b.id)
	if err != nil {
		return s.end(ctx, b, build.StateFailed, err.Error(), nil, nil)
	}
	return s.send(ctx, b, n, spec)
}

// send posts a spec to a node; a node that refuses it fails the build, a
// node that cannot be reached gets it again next pass.
func (s *Scheduler) send(ctx context.Context, b openBuild, n *node, spec build.Spec) error {
	err := s.agents.CreateBuild(ctx, n.address, spec)
	switch {
	case err == nil:
		if _, err := s.pool.Exec(ctx, Q("BuildAccepted"), b.id); err != nil {
			return fmt.Errorf("cannot record that node %s accepted build %s: %w", n.name(), b.id, err)
		}
		return nil
	case agents.IsRejected(err):
		return s.end(ctx, b, build.StateFailed, fmt.Sprintf("node %s refused the build: %v", n.name(), err), nil, nil)
	default:
		s.log.Warn("cannot send build to node; retrying", "build_id", b.id, "node_id", n.id, "err", err)
		return nil
	}
}

// ErrNoRegistry fails builds while BUILD_REGISTRY is not set.
var ErrNoRegistry = errors.New("no build registry is configured: set BUILD_REGISTRY on the operator")

// spec is what a node needs to run a build; the git token is decrypted
// only here.
func (s *Scheduler) spec(ctx context.Context, id uuid.UUID) (build.Spec, error) {
	var sp build.Spec
	var dep, project uuid.UUID
	var kind, gitURL, sha, srcSHA, dockerfile, buildContext, projectName, orgName string
	var source *uuid.UUID
	var nonce, ct []byte
	err := s.pool.QueryRow(ctx, Q("BuildSpec"), id).Scan(&dep, &project, &kind, &gitURL, &sha, &source, &srcSHA,
		&dockerfile, &buildContext, &nonce, &ct, &projectName, &orgName)
	if err != nil {
		return sp, fmt.Errorf("cannot read build %s: %w", id, err)
	}
	image := TargetImage(s.cfg.Registry, orgName, projectName, Tag(sha, srcSHA))
	if image == "" {
		return sp, ErrNoRegistry
	}
	sp = build.Spec{ID: id.String(), DeploymentID: dep.String(), ProjectID: project.String(), Dockerfile: dockerfile,
		Context: buildContext, Image: image, TimeoutS: int(s.cfg.Timeout / time.Second),
		VCPUs: s.cfg.VCPUs, MemoryMiB: s.cfg.MemoryMiB, DiskMiB: s.cfg.DiskMiB}
	switch kind {
	case "archive":
		if source == nil {
			return sp, errors.New("the build's source archive is gone")
		}
		sp.Source.ArchivePath = "/api/v1/internal/sources/" + source.String()
	default:
		if gitURL == "" {
			return sp, errors.New("the project has no repository (set github_repo or git_url)")
		}
		sp.Source.GitURL, sp.Source.CommitSHA = gitURL, sha
		if nonce != nil {
			tok, err := s.seal.Open(project.String(), GitTokenName, nonce, ct)
			if err != nil {
				return sp, fmt.Errorf("cannot decrypt the project's git token: %w", err)
			}
			sp.Source.GitToken = tok
		}
	}
	if err := sp.Validate(); err != nil {
		return sp, err
	}
	return sp, nil
}
