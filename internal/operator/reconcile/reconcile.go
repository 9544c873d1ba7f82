// Package reconcile advances deployments toward what PostgreSQL says
// should run, one level-triggered pass at a time: it marks silent nodes
// down, resolves images, places instances (internal/operator/placement),
// tells node agents to create or delete them, gates promotion on health,
// fails deployments at their deadline, stops superseded ones after the
// retention window, scales, drains, spreads instances placed while few
// nodes were ready over the nodes that joined since, and deletes VMs nobody wants. Only
// the operator holding the leader lock runs it (docs/adr/0400).
package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/operator/agents"
	"github.com/zeitwork/zeitwork/internal/operator/placement"
	"github.com/zeitwork/zeitwork/internal/operator/secrets"
	"github.com/zeitwork/zeitwork/internal/store"
)

// Config is the reconciler's part of the operator configuration.
type Config struct {
	DeployTimeout      time.Duration
	Retention          time.Duration
	NodeDownAfter      time.Duration
	OrphanScanEvery    time.Duration
	InsecureRegistries []string
}

// Reconciler runs passes; it is not safe for concurrent passes (one
// leader loop owns it).
type Reconciler struct {
	cfg         Config
	pool        *pgxpool.Pool
	agents      *agents.Client
	seal        *secrets.Sealer
	log         *slog.Logger
	transitions *prometheus.CounterVec

	lastOrphanScan time.Time
}

// New builds a reconciler; transitions counts deployment status changes
// by status.
func New(cfg Config, pool *pgxpool.Pool, ag *agents.Client, seal *secrets.Sealer, log *slog.Logger, transitions *prometheus.CounterVec) *Reconciler {
	return &Reconciler{cfg: cfg, pool: pool, agents: ag, seal: seal, log: log, transitions: transitions}
}

// Q is the named query from internal/store.
func Q(name string) string { return store.Q(name) }

type openDeployment struct {
	id               uuid.UUID
	status, image    string
	preview, pastDue bool
	projectID        uuid.UUID
	project, org     string
	port             int
	healthPath       string
	minPerRegion     int
	vcpus, memoryMiB int
	active           bool
	digest           string
	finishedAt       *time.Time
	branch           string
	build            bool // built from source (internal/operator/builds takes it from pending to preparing)
}

// Pass is one level-triggered pass over the whole cluster: it
// compares what PostgreSQL says should run with what node agents report,
// and takes one step where they differ.
func (o *Reconciler) Pass(ctx context.Context) error {
	rows, err := o.pool.Query(ctx, Q("NodesMarkDown"), store.Interval(o.cfg.NodeDownAfter))
	if err != nil {
		return err
	}
	down, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return err
	}
	for _, id := range down {
		o.log.Warn("node missed its heartbeats; marked down", "node_id", id)
	}
	// Instances on down nodes stop counting; replacements are placed below.
	tag, err := o.pool.Exec(ctx, Q("InstancesOfDownNodesStop"))
	if err != nil {
		return err
	}
	if tag.RowsAffected() > 0 {
		if _, err := o.pool.Exec(ctx, Q("BumpRoutes")); err != nil {
			return err
		}
	}
	if _, err := o.pool.Exec(ctx, Q("InstancesOfLostNodesForget")); err != nil {
		return err
	}
	// Crash-looped instances are replaced; closed deployments run nothing.
	if _, err := o.pool.Exec(ctx, Q("InstancesFailedStop")); err != nil {
		return err
	}
	tag, err = o.pool.Exec(ctx, Q("InstancesOfClosedDeploymentsStop"))
	if err != nil {
		return err
	}
	if tag.RowsAffected() > 0 {
		o.log.Warn("instances of closed deployments were still to run; stopping them", "instances", tag.RowsAffected())
		if _, err := o.pool.Exec(ctx, Q("BumpRoutes")); err != nil {
			return err
		}
	}
	rows, err = o.pool.Query(ctx, Q("OpenDeployments"))
	if err != nil {
		return err
	}
	deps, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (openDeployment, error) {
		var d openDeployment
		return d, row.Scan(&d.id, &d.status, &d.image, &d.preview, &d.pastDue, &d.projectID, &d.project, &d.org, &d.port,
			&d.healthPath, &d.minPerRegion, &d.vcpus, &d.memoryMiB, &d.active, &d.digest, &d.finishedAt, &d.branch, &d.build)
	})
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range deps {
		if err := o.step(ctx, d); err != nil {
			errs = append(errs, fmt.Errorf("deployment %s: %w", d.id, err))
		}
	}
	// Superseded deployments past the retention window stop their VMs.
	rows, err = o.pool.Query(ctx, Q("SupersededExpired"), store.Interval(o.cfg.Retention))
	if err != nil {
		return err
	}
	expired, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return err
	}
	for _, id := range expired {
		o.log.Info("retention window over; stopping instances", "deployment_id", id)
		if _, err := o.pool.Exec(ctx, Q("StopDeploymentInstances"), id); err != nil {
			return err
		}
	}
	if len(expired) > 0 {
		if _, err := o.pool.Exec(ctx, Q("BumpRoutes")); err != nil {
			return err
		}
	}
	if err := o.stopInstances(ctx); err != nil {
		errs = append(errs, err)
	}
	if time.Since(o.lastOrphanScan) >= o.cfg.OrphanScanEvery {
		o.lastOrphanScan = time.Now()
		if err := o.collectOrphans(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (o *Reconciler) setStatus(ctx context.Context, id uuid.UUID, status, reason string) error {
	if err := store.SetStatus(ctx, o.pool, id, status, reason); err != nil {
		return err
	}
	o.transitions.WithLabelValues(status).Inc()
	o.log.Info("deployment status", "deployment_id", id, "status", status, "reason", reason)
	return nil
}

func (o *Reconciler) promote(ctx context.Context, projectID, deploymentID uuid.UUID) error {
	if err := store.Promote(ctx, o.pool, projectID, deploymentID); err != nil {
		return err
	}
	o.transitions.WithLabelValues("active").Inc()
	o.log.Info("promoted", "project_id", projectID, "deployment_id", deploymentID)
	return nil
}

// projectEnv decrypts a project's variables for its instances.
func (o *Reconciler) projectEnv(ctx context.Context, projectID uuid.UUID) (map[string]string, error) {
	rows, err := o.pool.Query(ctx, Q("EnvAll"), projectID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var name string
		var nonce, ct []byte
		if err := rows.Scan(&name, &nonce, &ct); err != nil {
			return nil, err
		}
		v, err := o.seal.Open(projectID.String(), name, nonce, ct)
		if err != nil {
			return nil, err
		}
		out[name] = v
	}
	return out, rows.Err()
}

// step advances one deployment.
func (o *Reconciler) step(ctx context.Context, d openDeployment) error {
	switch d.status {
	case "pending":
		if d.build {
			// Its build is queued; the build scheduler moves it on to
			// preparing with the image the build pushed.
			tag, err := o.pool.Exec(ctx, Q("DeploymentStartBuilding"), d.id)
			if err != nil || tag.RowsAffected() == 0 {
				return err
			}
			o.transitions.WithLabelValues("building").Inc()
			o.log.Info("deployment status", "deployment_id", d.id, "status", "building")
			return nil
		}
		return o.setStatus(ctx, d.id, "preparing", "")
	case "preparing":
		ref, digest, size, err := o.resolve(ctx, d.image)
		if err != nil {
			return o.setStatus(ctx, d.id, "failed", fmt.Sprintf("cannot resolve image %s: %v", d.image, err))
		}
		var imageID uuid.UUID
		if err := o.pool.QueryRow(ctx, Q("ImageUpsert"), uuid.Must(uuid.NewV7()), d.image, digest, size, "{}").Scan(&imageID); err != nil {
			return err
		}
		if _, err := o.pool.Exec(ctx, Q("DeploymentSetImage"), d.id, imageID); err != nil {
			return err
		}
		_ = ref
		return o.setStatus(ctx, d.id, "starting", "")
	}
	if d.digest == "" {
		return nil
	}
	placed, short, err := o.ensureInstances(ctx, d)
	if errors.Is(err, errStale) {
		o.log.Info("deployment closed or node left ready while instances were placed; the next pass places again", "deployment_id", d.id)
		return nil
	}
	if err != nil {
		return err
	}
	switch d.status {
	case "starting":
		if placed && o.allHealthy(ctx, d) {
			if err := o.setStatus(ctx, d.id, "healthy", ""); err != nil {
				return err
			}
			d.status = "healthy"
		} else if d.pastDue {
			reason := short
			if reason == "" {
				reason = o.healthReason(ctx, d)
			}
			return o.setStatus(ctx, d.id, "failed", reason)
		}
	}
	if d.status != "healthy" || d.active {
		return nil
	}
	if d.preview {
		return pgx.BeginFunc(ctx, o.pool, func(tx pgx.Tx) error {
			tag, err := tx.Exec(ctx, Q("PreviewsSupersede"), d.projectID, d.branch, d.id)
			if err != nil || tag.RowsAffected() == 0 {
				return err
			}
			_, err = tx.Exec(ctx, Q("BumpRoutes"))
			return err
		})
	}
	var promote bool
	if err := o.pool.QueryRow(ctx, Q("ShouldPromote"), d.id).Scan(&promote); err != nil {
		return err
	}
	if promote {
		return o.promote(ctx, d.projectID, d.id)
	}
	// Healthy but older than what is live (it finished after a newer
	// deployment): it never goes live; retention then stops it.
	return o.setStatus(ctx, d.id, "superseded", "a newer deployment went live first")
}

// resolve turns a reference into its manifest digest (linux/amd64).
func (o *Reconciler) resolve(ctx context.Context, image string) (string, string, int64, error) {
	var opts []name.Option
	host := strings.SplitN(image, "/", 2)[0]
	h, _, err := net.SplitHostPort(host)
	if err != nil {
		h = host
	}
	if h == "localhost" || (net.ParseIP(h) != nil && net.ParseIP(h).IsLoopback()) {
		opts = append(opts, name.Insecure)
	}
	for _, r := range o.cfg.InsecureRegistries {
		if r == host {
			opts = append(opts, name.Insecure)
		}
	}
	ref, err := name.ParseReference(image, opts...)
	if err != nil {
		return "", "", 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	desc, err := remote.Head(ref, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain))
	if err != nil {
		return "", "", 0, err
	}
	return ref.Context().Digest(desc.Digest.String()).String(), desc.Digest.String(), desc.Size, nil
}

type nodeCap struct {
	id, regionID     uuid.UUID
	region, address  string
	vcpus, mem       int
	usedCPU, usedMem int
}

// errStale: after the pass read them, the deployment was stopped (or its
// project deleted) or the node picked left ready (drained, down, removed);
// the pass leaves the deployment to the next one, which reads afresh.
var errStale = errors.New("deployment closed or node no longer ready")

// ensureInstances places missing instances: min per region in every region
// with nodes, on distinct ready nodes where possible, within capacity. It
// reports whether every region is fully placed and, if not, why.
func (o *Reconciler) ensureInstances(ctx context.Context, d openDeployment) (bool, string, error) {
	rows, err := o.pool.Query(ctx, Q("ReadyNodes"), store.Interval(o.cfg.NodeDownAfter/2))
	if err != nil {
		return false, "", err
	}
	nodes, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (*nodeCap, error) {
		n := &nodeCap{}
		return n, row.Scan(&n.id, &n.regionID, &n.region, &n.address, &n.vcpus, &n.mem, &n.usedCPU, &n.usedMem)
	})
	if err != nil {
		return false, "", err
	}
	rows, err = o.pool.Query(ctx, Q("AllRegions"))
	if err != nil {
		return false, "", err
	}
	type region struct {
		id   uuid.UUID
		name string
	}
	regions, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (region, error) {
		var r region
		return r, row.Scan(&r.id, &r.name)
	})
	if err != nil {
		return false, "", err
	}
	if len(regions) == 0 {
		return false, "no regions with worker nodes", nil
	}
	byID := map[string]*nodeCap{}
	for _, n := range nodes {
		byID[n.id.String()] = n
	}
	insts, err := store.InstancesOf(ctx, o.pool, d.id)
	if err != nil {
		return false, "", err
	}
	var env map[string]string
	var shorts []string
	routesChanged := false
	complete := true
	for _, r := range regions {
		perNode := map[uuid.UUID]int{}
		have := 0
		healthyReady := 0
		var draining []uuid.UUID
		for _, in := range insts {
			if in.Region != r.name || in.Desired != "running" {
				continue
			}
			switch in.NodeState {
			case "ready":
				have++
				perNode[in.NodeID]++
				if in.Healthy {
					healthyReady++
				}
			case "draining":
				draining = append(draining, in.ID)
			}
		}
		// Drained nodes give up their instances once replacements serve.
		if healthyReady >= d.minPerRegion {
			for _, id := range draining {
				if _, err := o.pool.Exec(ctx, Q("InstanceSetDesired"), id, "stopped"); err != nil {
					return false, "", err
				}
				routesChanged = true
			}
		}
		// More than wanted (scaled down, or a move to spread the
		// deployment has its new instance): the surplus stops once enough
		// healthy instances serve (placement.Surplus says which).
		if have > d.minPerRegion {
			var cands []placement.Instance
			for _, in := range insts {
				if in.Region == r.name && in.Desired == "running" && in.NodeState == "ready" {
					placed := time.Unix(in.ID.Time().UnixTime())
					cands = append(cands, placement.Instance{ID: in.ID.String(), Node: in.NodeID.String(), Healthy: in.Healthy,
						Young: time.Since(placed) < o.cfg.DeployTimeout})
				}
			}
			for _, id := range placement.Surplus(cands, d.minPerRegion) {
				if _, err := o.pool.Exec(ctx, Q("InstanceSetDesired"), id, "stopped"); err != nil {
					return false, "", err
				}
				routesChanged = true
				o.log.Info("stopping surplus instance", "deployment_id", d.id, "instance_id", id, "region", r.name)
			}
			continue
		}
		var free []*placement.Node
		for _, n := range nodes {
			free = append(free, &placement.Node{ID: n.id.String(), Region: n.region, FreeVCPUs: n.vcpus - n.usedCPU, FreeMemoryMiB: n.mem - n.usedMem})
		}
		existing := map[string]int{}
		for id, c := range perNode {
			existing[id.String()] = c
		}
		need := placement.Need{Region: r.name, Count: d.minPerRegion - have, VCPUs: d.vcpus, MemoryMiB: d.memoryMiB, Existing: existing}
		var picks []string
		var short int
		if have < d.minPerRegion {
			picks, short = placement.Place(free, need)
		} else if healthyReady >= d.minPerRegion {
			// Placed while few of the region's nodes were ready: one more
			// instance on an empty node, then Surplus stops a crowded one.
			if pick, ok := placement.Respread(free, need); ok {
				picks = []string{pick}
				o.log.Info("spreading the deployment over the region's nodes", "deployment_id", d.id, "region", r.name, "node_id", pick)
			}
		}
		if short > 0 {
			complete = false
			shorts = append(shorts, fmt.Sprintf("region %s: no room for %d of %d instance(s) of %d vCPU / %d MiB on its ready nodes",
				r.name, short, d.minPerRegion, d.vcpus, d.memoryMiB))
		}
		for _, pick := range picks {
			n := byID[pick]
			id := uuid.Must(uuid.NewV7())
			tag, err := o.pool.Exec(ctx, Q("InstanceInsert"), id, d.id, n.id, r.id, d.vcpus, d.memoryMiB)
			if err != nil {
				return false, "", err
			}
			if tag.RowsAffected() == 0 {
				return false, "", errStale
			}
			routesChanged = true
			n.usedCPU += d.vcpus
			n.usedMem += d.memoryMiB
			insts = append(insts, store.Instance{ID: id, DeploymentID: d.id, NodeID: n.id, Region: r.name, State: "pending", Desired: "running", NodeAddress: n.address, NodeState: "ready"})
			o.log.Info("placed instance", "deployment_id", d.id, "instance_id", id, "node_id", n.id, "region", r.name)
		}
	}
	if routesChanged {
		if _, err := o.pool.Exec(ctx, Q("BumpRoutes")); err != nil {
			return false, "", err
		}
	}
	// (Re)send the spec of every instance the agent has not reported yet;
	// agents treat a repeated create as a no-op. Nodes are asked
	// concurrently, as in stopInstances: a node that does not answer costs
	// one timeout, and its other creates wait for the next pass.
	byNode := map[string][]uuid.UUID{}
	for _, in := range insts {
		if in.Desired != "running" || in.State != "pending" || in.NodeState == "down" {
			continue
		}
		if env == nil {
			if env, err = o.projectEnv(ctx, d.projectID); err != nil {
				return false, "", err
			}
		}
		byNode[in.NodeAddress] = append(byNode[in.NodeAddress], in.ID)
	}
	_ = perNode(byNode, func(addr string, ids []uuid.UUID) error {
		for _, id := range ids {
			spec := agents.Spec{ID: id.String(), DeploymentID: d.id.String(), Image: d.imageRef(), Port: d.port, VCPUs: d.vcpus,
				MemoryMiB: d.memoryMiB, Env: env, HealthPath: d.healthPath}
			if err := o.agents.Create(ctx, addr, spec); err != nil {
				o.log.Warn("cannot create instance on node", "instance_id", id, "node", addr, "err", err)
				if !agents.IsStatus(err) {
					return nil
				}
			}
		}
		return nil
	})
	return complete, strings.Join(shorts, "; "), nil
}

func (d openDeployment) imageRef() string { return pinned(d.image, d.digest) }

// pinned replaces the tag or digest of image with digest, so every node
// runs exactly the bytes the deployment resolved.
func pinned(image, digest string) string {
	repo := image
	if i := strings.LastIndex(image, "@"); i >= 0 {
		repo = image[:i]
	} else if j := strings.LastIndex(image, ":"); j > strings.LastIndex(image, "/") {
		repo = image[:j]
	}
	return repo + "@" + digest
}

// allHealthy reports whether every region has min healthy instances.
func (o *Reconciler) allHealthy(ctx context.Context, d openDeployment) bool {
	insts, err := store.InstancesOf(ctx, o.pool, d.id)
	if err != nil {
		return false
	}
	healthy := map[string]int{}
	for _, in := range insts {
		if in.Desired == "running" && in.Healthy && in.NodeState != "down" {
			healthy[in.Region]++
		}
	}
	var regions int
	if err := o.pool.QueryRow(ctx, Q("RegionsWithNodesCount")).Scan(&regions); err != nil || regions == 0 {
		return false
	}
	if len(healthy) < regions {
		return false
	}
	for _, n := range healthy {
		if n < d.minPerRegion {
			return false
		}
	}
	return true
}

func (o *Reconciler) healthReason(ctx context.Context, d openDeployment) string {
	insts, _ := store.InstancesOf(ctx, o.pool, d.id)
	total, healthy := 0, 0
	var errs []string
	for _, in := range insts {
		if in.Desired != "running" {
			continue
		}
		total++
		if in.Healthy {
			healthy++
		} else if in.Error != "" && len(errs) < 3 {
			errs = append(errs, in.Error)
		}
	}
	reason := fmt.Sprintf("not healthy within %s: %d of %d instances passed the health check on %s", o.cfg.DeployTimeout, healthy, total, d.healthPath)
	if len(errs) > 0 {
		reason += " (" + strings.Join(errs, "; ") + ")"
	}
	return reason
}

// stopInstances asks node agents to remove instances that should not run.
// Nodes are asked concurrently (each node's instances one after the
// other): a node that stopped answering without refusing — its region cut
// off, not yet marked down — costs the pass one agent timeout, not one
// per instance and node.
func (o *Reconciler) stopInstances(ctx context.Context) error {
	rows, err := o.pool.Query(ctx, Q("InstancesToStop"))
	if err != nil {
		return err
	}
	type stop struct {
		id   uuid.UUID
		addr string
	}
	list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (stop, error) {
		var s stop
		return s, row.Scan(&s.id, &s.addr)
	})
	if err != nil {
		return err
	}
	byNode := map[string][]uuid.UUID{}
	for _, s := range list {
		byNode[s.addr] = append(byNode[s.addr], s.id)
	}
	err = perNode(byNode, func(addr string, ids []uuid.UUID) error {
		for _, id := range ids {
			if err := o.agents.Delete(ctx, addr, id.String()); err != nil {
				o.log.Warn("cannot stop instance", "instance_id", id, "err", err)
				if !agents.IsStatus(err) {
					return nil // the node does not answer: its other instances wait for the next pass
				}
				continue
			}
			if _, err := o.pool.Exec(ctx, Q("InstanceDelete"), id); err != nil {
				return err
			}
		}
		return nil
	})
	if len(list) > 0 {
		_, _ = o.pool.Exec(ctx, Q("BumpRoutes"))
	}
	return err
}

// nodeConcurrency bounds the node agents a pass talks to at once.
const nodeConcurrency = 16

// perNode runs fn for every node of work, up to nodeConcurrency at once,
// and joins their errors.
func perNode[K comparable, T any](work map[K]T, fn func(node K, w T) error) error {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		sem  = make(chan struct{}, nodeConcurrency)
	)
	for node, w := range work {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := fn(node, w); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// collectOrphans deletes VMs that node agents run but the database does not
// know (or no longer wants): left over from an operator crash between a
// create and its record, or from a node that came back after being
// replaced. Only the leader runs it.
func (o *Reconciler) collectOrphans(ctx context.Context) error {
	rows, err := o.pool.Query(ctx, Q("ReadyNodeAddresses"))
	if err != nil {
		return err
	}
	type node struct {
		id   uuid.UUID
		addr string
	}
	nodes, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (node, error) {
		var n node
		return n, row.Scan(&n.id, &n.addr)
	})
	if err != nil {
		return err
	}
	addrs := make(map[uuid.UUID]string, len(nodes))
	for _, n := range nodes {
		addrs[n.id] = n.addr
	}
	// Concurrently, as in stopInstances: a silent node costs one timeout.
	return perNode(addrs, func(nodeID uuid.UUID, addr string) error {
		listed, err := o.agents.List(ctx, addr)
		if err != nil {
			o.log.Warn("cannot list instances of node", "node_id", nodeID, "err", err)
			return nil
		}
		var ids []uuid.UUID
		for _, in := range listed {
			if id, err := uuid.Parse(in.ID); err == nil {
				ids = append(ids, id)
			}
		}
		rows, err := o.pool.Query(ctx, Q("InstancesKnownOnNode"), nodeID, ids)
		if err != nil {
			return err
		}
		known, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil {
			return err
		}
		for _, id := range ids {
			if slices.Contains(known, id) {
				continue
			}
			o.log.Warn("deleting an instance the database does not know", "node_id", nodeID, "instance_id", id)
			if err := o.agents.Delete(ctx, addr, id.String()); err != nil {
				o.log.Warn("cannot delete orphan instance", "instance_id", id, "err", err)
			}
		}
		return nil
	})
}
