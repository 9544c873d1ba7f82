package operator

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/httpjson"
	"github.com/zeitwork/zeitwork/internal/operator/agents"
	"github.com/zeitwork/zeitwork/internal/operator/names"
	"github.com/zeitwork/zeitwork/internal/operator/routes"
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
	// Builds from source: the slots the node offers and every build it
	// holds (running or finished and not yet deleted).
	MaxBuilds int            `json:"max_builds"`
	Builds    []build.Status `json:"builds"`
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
	if rep.MaxBuilds < 0 || rep.MaxBuilds > 1024 {
		return invalid("max_builds must be 0-1024")
	}
	if rep.Builds == nil {
		rep.Builds = []build.Status{}
	}
	for i := range rep.Builds { // jsonb holds no NUL; errors carry builder output
		st := &rep.Builds[i]
		st.Error = strings.ReplaceAll(st.Error, "\x00", "")
		if len(st.Error) > 64<<10 {
			st.Error = st.Error[len(st.Error)-64<<10:]
		}
		st.ID, st.State, st.Image = strings.ReplaceAll(st.ID, "\x00", ""), strings.ReplaceAll(st.State, "\x00", ""), strings.ReplaceAll(st.Image, "\x00", "")
	}
	reportedBuilds, err := json.Marshal(rep.Builds)
	if err != nil {
		return invalid("builds: %v", err)
	}
	changed, buildsChanged := false, false
	err = o.tx(r.Context(), func(tx pgx.Tx) error {
		region, err := regionID(r.Context(), tx, rep.Region)
		if err != nil {
			return err
		}
		var inserted bool
		if err := tx.QueryRow(r.Context(), Q("NodeUpsert"), nodeID, region, rep.Hostname, rep.Address, rep.VCPUs, rep.MemoryMiB, rep.DiskBytes,
			rep.MaxBuilds).Scan(&inserted); err != nil {
			return err
		}
		// The leader acts on the builds' states (internal/operator/builds).
		if err := tx.QueryRow(r.Context(), Q("NodeBuildsReport"), nodeID, reportedBuilds).Scan(new(uuid.UUID)); err == nil {
			buildsChanged = true
			if _, err := tx.Exec(r.Context(), "SELECT pg_notify('zeitwork_reconcile', '')"); err != nil {
				return err
			}
		} else if !isNoRows(err) {
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
	if changed || buildsChanged {
		o.nudge()
	}
	httpjson.Write(w, 200, map[string]any{"ok": true})
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
		region, err := regionID(r.Context(), tx, req.Region)
		if err != nil {
			return err
		}
		_, err = tx.Exec(r.Context(), Q("EdgeUpsert"), req.ID, region, req.HTTPSAddress, req.HTTPAddress)
		return err
	})
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, map[string]any{"ok": true})
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
	httpjson.Write(w, 200, out)
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
		MaxBuilds       int       `json:"max_builds"`
		Builds          int       `json:"builds"` // running
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (node, error) {
		var n node
		return n, row.Scan(&n.ID, &n.Region, &n.Hostname, &n.Address, &n.State, &n.VCPUs, &n.MemoryMiB, &n.LastHeartbeatAt, &n.Instances,
			&n.MaxBuilds, &n.Builds)
	})
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, map[string]any{"nodes": out})
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
		httpjson.Write(w, 200, map[string]any{"id": r.PathValue("id"), "state": state})
		return nil
	}
}

// removeNode removes a node for good: one that is drained (or down) and
// runs nothing any more. Its agent should be stopped first; a removed
// node's heartbeats do not bring it back.
func (o *Operator) removeNode(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	err := o.tx(r.Context(), func(tx pgx.Tx) error {
		var (
			nodeID                       uuid.UUID
			state                        string
			running, stopping, buildsRun int
		)
		err := tx.QueryRow(r.Context(), Q("NodeForRemoval"), id).Scan(&nodeID, &state, &running, &stopping, &buildsRun)
		if isNoRows(err) {
			return notFound("node " + id)
		}
		if err != nil {
			return err
		}
		switch {
		case state == "ready":
			return fmt.Errorf("%w: node %s is ready; drain it first (POST /api/v1/nodes/%s/drain) and wait until it runs no instances", errConflict, id, id)
		case running > 0:
			return fmt.Errorf("%w: node %s still runs %d instances; wait until the drain has moved them", errConflict, id, running)
		case stopping > 0 && state != "down":
			return fmt.Errorf("%w: node %s is still stopping %d instances; try again when they are gone", errConflict, id, stopping)
		case buildsRun > 0:
			return fmt.Errorf("%w: node %s still runs %d builds; try again when they end", errConflict, id, buildsRun)
		}
		_, err = tx.Exec(r.Context(), Q("NodeRemove"), nodeID)
		return err
	})
	if err != nil {
		return err
	}
	o.notify(r.Context(), "zeitwork_reconcile")
	httpjson.Write(w, 200, map[string]any{"id": id, "removed": true})
	return nil
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
	httpjson.Write(w, 200, map[string]any{"regions": out})
	return nil
}

// routes serves the table; with ?version=V&wait=D it long-polls until the
// table differs from V. With &heartbeat=H as well it answers the status
// and headers at once (a Zeitwork-Heartbeat header says so) and writes a
// space every H while it waits — JSON decoders skip leading whitespace —
// so a client can tell an operator that is still there from one it lost
// (internal/edge/routetable) within seconds instead of a whole wait.
func (o *Operator) routes(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	var wait, heartbeat time.Duration
	if v := q.Get("wait"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return invalid("wait %q is not a duration like 30s", v)
		}
		wait = min(d, 60*time.Second)
	}
	if v := q.Get("heartbeat"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return invalid("heartbeat %q is not a duration like 2s", v)
		}
		heartbeat = min(max(d, 100*time.Millisecond), 30*time.Second)
	}
	have := q.Get("version")
	// A shutdown answers with the current table at once.
	ctx, cancel := o.untilDrained(r.Context())
	defer cancel()
	waitFor := func(d time.Duration) (*routes.Table, error) {
		rt, err := o.routeTable.Wait(ctx, have, d)
		if err != nil && ctx.Err() != nil && r.Context().Err() == nil {
			return o.routeTable.Current(r.Context()) // shutting down
		}
		return rt, err
	}
	if heartbeat == 0 || wait == 0 {
		rt, err := waitFor(wait)
		if err != nil {
			if r.Context().Err() != nil {
				return nil
			}
			return err
		}
		w.Header().Set("ETag", `"`+rt.Version+`"`)
		httpjson.Write(w, 200, rt)
		return nil
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Zeitwork-Heartbeat", heartbeat.String())
	w.WriteHeader(200)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	deadline := time.Now().Add(wait)
	for {
		rt, err := waitFor(min(heartbeat, time.Until(deadline)))
		if err != nil {
			// The status is sent: an unfinished body is the error the
			// client sees (and logs) before it tries another operator.
			if r.Context().Err() == nil {
				o.log.Warn("route table long poll failed", "err", err)
			}
			return nil
		}
		if rt.Version != have || !time.Now().Before(deadline) || ctx.Err() != nil {
			_ = json.NewEncoder(w).Encode(rt)
			return nil
		}
		if _, err := w.Write([]byte{' '}); err != nil {
			return nil
		}
		if err := rc.Flush(); err != nil {
			return nil
		}
	}
}

// regionID returns the id of the region called name, creating it when
// missing. It reads without locking: an upsert (ON CONFLICT DO UPDATE)
// locks the region's row until its transaction commits, and every
// heartbeat of a region would then wait for the one before it, each
// holding the lock for several round trips to the database — enough, from
// a region far from the database, to time heartbeats out and mark healthy
// nodes down (ADR 0802).
func regionID(ctx context.Context, tx pgx.Tx, name string) (uuid.UUID, error) {
	var id uuid.UUID
	err := tx.QueryRow(ctx, Q("RegionID"), name).Scan(&id)
	if isNoRows(err) {
		err = tx.QueryRow(ctx, Q("RegionUpsert"), newID(), name).Scan(&id)
	}
	return id, err
}

// EnsureRegion creates a region row (used by tests and bootstrap).
func (o *Operator) EnsureRegion(ctx context.Context, name string) error {
	if err := names.ValidLabel(name); err != nil {
		return fmt.Errorf("region: %w", err)
	}
	_, err := o.pool.Exec(ctx, Q("RegionUpsert"), newID(), name)
	return err
}
