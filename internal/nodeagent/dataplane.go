package nodeagent

import (
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/zeitwork/zeitwork/internal/dataplane"
)

// routeTable is the agent's side of the data plane (ADR 0354): the route
// of every instance, written to the table file the data plane process
// follows whenever one changes. Its lock is taken last (under a.mu and an
// instance's mu), and it takes no other.
type routeTable struct {
	path   string
	nodeID string
	log    *slog.Logger

	mu     sync.Mutex
	routes map[string]dataplane.Route
}

func newRouteTable(workDir, nodeID string, log *slog.Logger) *routeTable {
	return &routeTable{path: dataplane.PathsFor(workDir).Table, nodeID: nodeID, log: log, routes: map[string]dataplane.Route{}}
}

// routeOf is where the data plane sends an instance's traffic.
func routeOf(st Status) dataplane.Route {
	r := dataplane.Route{State: st.State}
	if st.State == StateRunning && st.IP != "" {
		r.Addr = net.JoinHostPort(st.IP, strconv.Itoa(st.Port))
	}
	return r
}

// set records instance id's route (none: it is gone) and rewrites the
// table when that changed.
func (t *routeTable) set(id string, st *Status) {
	t.mu.Lock()
	defer t.mu.Unlock()
	old, had := t.routes[id]
	if st == nil {
		if !had {
			return
		}
		delete(t.routes, id)
	} else {
		r := routeOf(*st)
		if had && old == r {
			return
		}
		t.routes[id] = r
	}
	t.writeLocked()
}

// write rewrites the table as it is (an agent start replaces whatever a
// previous process left).
func (t *routeTable) write() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.writeLocked()
}

func (t *routeTable) writeLocked() {
	err := dataplane.WriteTable(t.path, dataplane.Table{NodeID: t.nodeID, WrittenAt: time.Now().UTC(), Instances: t.routes})
	if err != nil {
		// The data plane keeps the previous table; the next change retries.
		t.log.Error("cannot publish routes to the data plane", "err", err)
	}
}
