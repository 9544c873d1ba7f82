package operator

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"net/http"
	"sort"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/operator/agents"
	"github.com/zeitwork/zeitwork/internal/operator/names"
)

type nodeReport struct {
	ID        string            `json:"id"`
	Hostname  string            `json:"hostname"`
	Region    string            `json:"region"`
	Address   string            `json:"address"`
	VCPUs     int               `json:"vcpus"`
	MemoryMiB int               `json:"memory_mib"`
	DiskBytes int64             `json:"disk_bytes"`
	Instances []agents.Instance `json:"instances"`
}

// nodeHeartbeat registers a node agent (first call) and records its
// instances' states.
func (o *Operator) nodeHeartbeat(w http.ResponseWriter, r *http.Request) error {
	var rep nodeReport
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 8<<20))
	if err := dec.Decode(&rep); err != nil {
		return invalid("malformed JSON: %v", err)
	}
	if pid := r.PathValue("id"); pid != "" && rep.ID == "" {
		rep.ID = pid
	}
	nodeID, err := uuid.Parse(rep.ID)
	if err != nil {
		return invalid("node id %q is not a UUID", rep.ID)
	}
	if err := names.ValidLabel(rep.Region); err != nil {
		return invalid("region: %v", err)
	}
	if rep.Address == "" || rep.VCPUs < 1 || rep.MemoryMiB < 1 {
		return invalid("address, vcpus and memory_mib are required")
	}
	changed := false
	err = o.tx(r.Context(), func(tx pgx.Tx) error {
		var regionID uuid.UUID
		if err := tx.QueryRow(r.Context(), Q("RegionUpsert"), newID(), rep.Region).Scan(&regionID); err != nil {
			return err
		}
		var inserted bool
		if err := tx.QueryRow(r.Context(), Q("NodeUpsert"), nodeID, regionID, rep.Hostname, rep.Address, rep.VCPUs, rep.MemoryMiB, rep.DiskBytes).Scan(&inserted); err != nil {
			return err
		}
		if inserted {
			changed = true
		}
		reported := make([]uuid.UUID, 0, len(rep.Instances))
		for _, in := range rep.Instances {
			iid, err := uuid.Parse(in.ID)
			if err != nil {
				continue
			}
			reported = append(reported, iid)
			var dep uuid.UUID
			err = tx.QueryRow(r.Context(), Q("InstanceReport"), iid, in.State, in.Healthy, in.IP, in.Restarts, in.Error, nodeID).Scan(&dep)
			if err == nil {
				changed = true
			} else if !isNoRows(err) {
				return err
			}
		}
		lost, err := tx.Exec(r.Context(), Q("InstancesLostByNode"), nodeID, reported)
		if err != nil {
			return err
		}
		if lost.RowsAffected() > 0 {
			o.log.Warn("node no longer reports instances it ran; recreating them", "node_id", nodeID, "count", lost.RowsAffected())
			changed = true
		}
		if changed {
			_, err := tx.Exec(r.Context(), Q("BumpRoutes"))
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	if changed {
		o.nudge()
	}
	writeJSON(w, 200, map[string]any{"ok": true})
	return nil
}

func (o *Operator) edgeHeartbeat(w http.ResponseWriter, r *http.Request) error {
	var req struct {
		ID           string `json:"id"`
		Region       string `json:"region"`
		HTTPSAddress string `json:"https_address"`
		HTTPAddress  string `json:"http_address"`
	}
	if err := decode(r, &req); err != nil {
		return err
	}
	if req.ID == "" || req.HTTPSAddress == "" {
		return invalid("id and https_address are required")
	}
	if err := names.ValidLabel(req.Region); err != nil {
		return invalid("region: %v", err)
	}
	err := o.tx(r.Context(), func(tx pgx.Tx) error {
		var regionID uuid.UUID
		if err := tx.QueryRow(r.Context(), Q("RegionUpsert"), newID(), req.Region).Scan(&regionID); err != nil {
			return err
		}
		_, err := tx.Exec(r.Context(), Q("EdgeUpsert"), req.ID, regionID, req.HTTPSAddress, req.HTTPAddress)
		return err
	})
	if err != nil {
		return err
	}
	writeJSON(w, 200, map[string]any{"ok": true})
	return nil
}

func (o *Operator) listEdges(w http.ResponseWriter, r *http.Request) error {
	rows, err := o.pool.Query(r.Context(), Q("EdgesList"), r.URL.Query().Get("region"), "60 seconds")
	if err != nil {
		return err
	}
	type edge struct {
		ID           string `json:"id"`
		Region       string `json:"region"`
		HTTPSAddress string `json:"https_address"`
		HTTPAddress  string `json:"http_address"`
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (edge, error) {
		var e edge
		return e, row.Scan(&e.ID, &e.Region, &e.HTTPSAddress, &e.HTTPAddress)
	})
	if err != nil {
		return err
	}
	writeJSON(w, 200, out)
	return nil
}

func (o *Operator) listNodes(w http.ResponseWriter, r *http.Request) error {
	rows, err := o.pool.Query(r.Context(), Q("NodesList"))
	if err != nil {
		return err
	}
	type node struct {
		ID              uuid.UUID `json:"id"`
		Region          string    `json:"region"`
		Hostname        string    `json:"hostname"`
		Address         string    `json:"address"`
		State           string    `json:"state"`
		VCPUs           int       `json:"vcpus"`
		MemoryMiB       int       `json:"memory_mib"`
		LastHeartbeatAt time.Time `json:"last_heartbeat_at"`
		Instances       int       `json:"instances"`
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (node, error) {
		var n node
		return n, row.Scan(&n.ID, &n.Region, &n.Hostname, &n.Address, &n.State, &n.VCPUs, &n.MemoryMiB, &n.LastHeartbeatAt, &n.Instances)
	})
	if err != nil {
		return err
	}
	writeJSON(w, 200, map[string]any{"nodes": out})
	return nil
}

func (o *Operator) setNodeState(state string) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		tag, err := o.pool.Exec(r.Context(), Q("NodeSetState"), r.PathValue("id"), state)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return notFound("node " + r.PathValue("id"))
		}
		o.notify(r.Context(), "zeitwork_reconcile")
		writeJSON(w, 200, map[string]any{"id": r.PathValue("id"), "state": state})
		return nil
	}
}

func (o *Operator) listRegions(w http.ResponseWriter, r *http.Request) error {
	rows, err := o.pool.Query(r.Context(), Q("RegionsList"))
	if err != nil {
		return err
	}
	type region struct {
		Name       string `json:"name"`
		ReadyNodes int    `json:"ready_nodes"`
		Nodes      int    `json:"nodes"`
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (region, error) {
		var x region
		return x, row.Scan(&x.Name, &x.ReadyNodes, &x.Nodes)
	})
	if err != nil {
		return err
	}
	writeJSON(w, 200, map[string]any{"regions": out})
	return nil
}

// RouteTable is what edge proxies consume.
type RouteTable struct {
	Version     string    `json:"version"`
	GeneratedAt time.Time `json:"generated_at"`
	Routes      []Route   `json:"routes"`
}

// Route maps a host to a deployment's instances.
type Route struct {
	Host         string          `json:"host"`
	Kind         string          `json:"kind"` // versioned | production | custom
	ProjectID    uuid.UUID       `json:"project_id"`
	DeploymentID uuid.UUID       `json:"deployment_id"`
	Instances    []RouteInstance `json:"instances"`
}

// RouteInstance is one backend of a route.
type RouteInstance struct {
	ID          uuid.UUID `json:"id"`
	NodeID      uuid.UUID `json:"node_id"`
	NodeAddress string    `json:"node_address"`
	Region      string    `json:"region"`
	Healthy     bool      `json:"healthy"`
}

// routeCacheMaxAge bounds how long a cached table is served without a
// rebuild, should a routing change ever miss its version bump.
const routeCacheMaxAge = 5 * time.Second

// currentRoutes returns the route table, rebuilt only when the database's
// route_table_version moved (every routing change bumps it in its own
// transaction) or the cached copy is older than routeCacheMaxAge. Waiting
// long-polls therefore cost one tiny query per wake-up.
func (o *Operator) currentRoutes(ctx context.Context) (*RouteTable, error) {
	var counter int64
	if err := o.pool.QueryRow(ctx, Q("RoutesVersion")).Scan(&counter); err != nil {
		return nil, err
	}
	o.routeCacheMu.Lock()
	c := o.routeCache
	o.routeCacheMu.Unlock()
	if c.table != nil && c.counter == counter && time.Since(c.built) < routeCacheMaxAge {
		return c.table, nil
	}
	built := time.Now()
	o.m.routeBuilds.Inc()
	rt, err := o.buildRoutes(ctx)
	if err != nil {
		return nil, err
	}
	o.routeCacheMu.Lock()
	if counter >= o.routeCache.counter {
		o.routeCache = routeCache{counter: counter, built: built, table: rt}
	}
	o.routeCacheMu.Unlock()
	return rt, nil
}

type routeCache struct {
	counter int64
	built   time.Time
	table   *RouteTable
}

// buildRoutes reads the route table; its version is a hash of its content,
// so every operator reports the same version for the same table.
func (o *Operator) buildRoutes(ctx context.Context) (*RouteTable, error) {
	inst := map[uuid.UUID][]RouteInstance{}
	rows, err := o.pool.Query(ctx, Q("RouteInstances"))
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var ri RouteInstance
		var dep uuid.UUID
		if err := rows.Scan(&ri.ID, &dep, &ri.NodeID, &ri.NodeAddress, &ri.Region, &ri.Healthy); err != nil {
			rows.Close()
			return nil, err
		}
		inst[dep] = append(inst[dep], ri)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	var routes []Route
	active := map[uuid.UUID]uuid.UUID{} // project → active deployment
	rows, err = o.pool.Query(ctx, Q("RouteDeployments"))
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var dep, proj uuid.UUID
		var host, pname, oname string
		var isActive bool
		if err := rows.Scan(&dep, &host, &proj, &pname, &oname, &isActive); err != nil {
			rows.Close()
			return nil, err
		}
		routes = append(routes, Route{Host: host, Kind: "versioned", ProjectID: proj, DeploymentID: dep, Instances: inst[dep]})
		if isActive {
			active[proj] = dep
			routes = append(routes, Route{Host: names.AliasLabel(pname, oname) + "." + o.cfg.AppsDomain, Kind: "production", ProjectID: proj, DeploymentID: dep, Instances: inst[dep]})
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	rows, err = o.pool.Query(ctx, Q("RouteDomains"))
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var name string
		var dep, proj uuid.UUID
		if err := rows.Scan(&name, &dep, &proj); err != nil {
			rows.Close()
			return nil, err
		}
		routes = append(routes, Route{Host: name, Kind: "custom", ProjectID: proj, DeploymentID: dep, Instances: inst[dep]})
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	sort.Slice(routes, func(i, j int) bool { return routes[i].Host < routes[j].Host })
	for _, rt := range routes {
		sort.Slice(rt.Instances, func(i, j int) bool { return rt.Instances[i].ID.String() < rt.Instances[j].ID.String() })
	}
	if routes == nil {
		routes = []Route{}
	}
	b, _ := json.Marshal(routes)
	h := fnv.New64a()
	h.Write(b)
	return &RouteTable{Version: strconv.FormatUint(h.Sum64(), 16), GeneratedAt: time.Now().UTC(), Routes: routes}, nil
}

// routes serves the table; with ?version=V&wait=D it long-polls until the
// table differs from V (woken by NOTIFY, re-checked every 500 ms).
func (o *Operator) routes(w http.ResponseWriter, r *http.Request) error {
	have := r.URL.Query().Get("version")
	wait, _ := time.ParseDuration(r.URL.Query().Get("wait"))
	wait = min(wait, 60*time.Second)
	deadline := time.Now().Add(wait)
	for {
		woken := o.routesChanged()
		rt, err := o.currentRoutes(r.Context())
		if err != nil {
			return err
		}
		if rt.Version != have || wait <= 0 || time.Now().After(deadline) {
			w.Header().Set("ETag", `"`+rt.Version+`"`)
			writeJSON(w, 200, rt)
			return nil
		}
		select {
		case <-r.Context().Done():
			return nil
		case <-woken:
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// EnsureRegion creates a region row (used by tests and bootstrap).
func (o *Operator) EnsureRegion(ctx context.Context, name string) error {
	if err := names.ValidLabel(name); err != nil {
		return fmt.Errorf("region: %w", err)
	}
	_, err := o.pool.Exec(ctx, Q("RegionUpsert"), newID(), name)
	return err
}
