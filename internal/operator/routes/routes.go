// Package routes builds the route table edge proxies follow (every
// versioned host, each project's production alias, verified custom
// domains, with their instances), caches it per route_table_version, and
// answers long polls that wait for it to change (docs/adr/0401).
package routes

import (
	"context"
	"encoding/json"
	"hash/fnv"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/operator/names"
	"github.com/zeitwork/zeitwork/internal/store"
)

// Source serves the route table of one operator process.
type Source struct {
	pool       *pgxpool.Pool
	appsDomain string
	builds     prometheus.Counter

	mu    sync.Mutex
	cache cache
	wake  chan struct{} // closed and replaced by Changed
}

// New reads routes from pool; builds counts cache misses.
func New(pool *pgxpool.Pool, appsDomain string, builds prometheus.Counter) *Source {
	return &Source{pool: pool, appsDomain: appsDomain, builds: builds, wake: make(chan struct{})}
}

// Changed wakes every waiting long poll; the operator calls it on each
// zeitwork_routes notification (and when its listener reconnects).
func (s *Source) Changed() {
	s.mu.Lock()
	close(s.wake)
	s.wake = make(chan struct{})
	s.mu.Unlock()
}

func (s *Source) woken() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.wake
}

// Wait returns the table at once when its version differs from have (or
// wait is 0), else when it changes or wait has passed. Besides
// notifications it re-checks every 500 ms, for a notification lost with a
// broken listener connection.
func (s *Source) Wait(ctx context.Context, have string, wait time.Duration) (*Table, error) {
	deadline := time.Now().Add(wait)
	for {
		woken := s.woken()
		rt, err := s.Current(ctx)
		if err != nil {
			return nil, err
		}
		if rt.Version != have || wait <= 0 || !time.Now().Before(deadline) {
			return rt, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-woken:
		case <-time.After(min(500*time.Millisecond, time.Until(deadline))):
		}
	}
}

// Table is what edge proxies consume.
type Table struct {
	Version     string    `json:"version"`
	GeneratedAt time.Time `json:"generated_at"`
	Routes      []Route   `json:"routes"`
}

// Route maps a host to a deployment's instances.
type Route struct {
	Host         string     `json:"host"`
	Kind         string     `json:"kind"` // versioned | production | custom
	ProjectID    uuid.UUID  `json:"project_id"`
	DeploymentID uuid.UUID  `json:"deployment_id"`
	Instances    []Instance `json:"instances"`
}

// Instance is one backend of a route.
type Instance struct {
	ID          uuid.UUID `json:"id"`
	NodeID      uuid.UUID `json:"node_id"`
	NodeAddress string    `json:"node_address"`
	Region      string    `json:"region"`
	Healthy     bool      `json:"healthy"`
}

// cacheMaxAge bounds how long a cached table is served without a
// rebuild, should a routing change ever miss its version bump.
const cacheMaxAge = 5 * time.Second

// currentRoutes returns the route table, rebuilt only when the database's
// route_table_version moved (every routing change bumps it in its own
// transaction) or the cached copy is older than cacheMaxAge. Waiting
// long-polls therefore cost one tiny query per wake-up.
func (s *Source) Current(ctx context.Context) (*Table, error) {
	var counter int64
	if err := s.pool.QueryRow(ctx, store.Q("RoutesVersion")).Scan(&counter); err != nil {
		return nil, err
	}
	s.mu.Lock()
	c := s.cache
	s.mu.Unlock()
	if c.table != nil && c.counter == counter && time.Since(c.built) < cacheMaxAge {
		return c.table, nil
	}
	built := time.Now()
	s.builds.Inc()
	rt, err := s.build(ctx)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if counter >= s.cache.counter {
		s.cache = cache{counter: counter, built: built, table: rt}
	}
	s.mu.Unlock()
	return rt, nil
}

type cache struct {
	counter int64
	built   time.Time
	table   *Table
}

// buildRoutes reads the route table; its version is a hash of its content,
// so every operator reports the same version for the same table.
func (s *Source) build(ctx context.Context) (*Table, error) {
	inst := map[uuid.UUID][]Instance{}
	rows, err := s.pool.Query(ctx, store.Q("RouteInstances"))
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var ri Instance
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
	rows, err = s.pool.Query(ctx, store.Q("RouteDeployments"))
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
			routes = append(routes, Route{Host: names.AliasLabel(pname, oname) + "." + s.appsDomain, Kind: "production", ProjectID: proj, DeploymentID: dep, Instances: inst[dep]})
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	rows, err = s.pool.Query(ctx, store.Q("RouteDomains"))
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
	return &Table{Version: strconv.FormatUint(h.Sum64(), 16), GeneratedAt: time.Now().UTC(), Routes: routes}, nil
}
