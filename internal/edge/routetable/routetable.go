// Package routetable keeps an edge proxy's copy of the operator's route
// table: it long-polls the operators (failing over between them), swaps in
// each new table atomically, persists the last one so a restarted edge
// serves at once, and keeps serving the last known table — reporting its
// age — while no operator answers.
package routetable

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/zeitwork/zeitwork/internal/fsutil"
)

// Instance is one backend of a route.
type Instance struct {
	ID          string `json:"id"`
	NodeID      string `json:"node_id"`
	NodeAddress string `json:"node_address"`
	Region      string `json:"region"`
	Healthy     bool   `json:"healthy"`
}

// Route maps a host to a deployment.
type Route struct {
	Host         string     `json:"host"`
	Kind         string     `json:"kind"`
	ProjectID    string     `json:"project_id"`
	DeploymentID string     `json:"deployment_id"`
	Instances    []Instance `json:"instances"`
}

// Table is one version of the route table.
type Table struct {
	Version     string    `json:"version"`
	GeneratedAt time.Time `json:"generated_at"`
	Routes      []Route   `json:"routes"`

	byHost map[string]*Route
}

func (t *Table) index() {
	t.byHost = make(map[string]*Route, len(t.Routes))
	for i := range t.Routes {
		t.byHost[strings.ToLower(t.Routes[i].Host)] = &t.Routes[i]
	}
}

// Lookup returns the route for host (lower-case, no port).
func (t *Table) Lookup(host string) *Route {
	if t == nil {
		return nil
	}
	return t.byHost[host]
}

// Options configure a Client.
type Options struct {
	Operators []*url.URL
	Token     string
	StateFile string // where the last table is persisted; optional
	Log       *slog.Logger
	HTTP      *http.Client
	// Wait is the long-poll duration (default 30 s).
	Wait time.Duration
}

// Client follows the operators' route table.
type Client struct {
	Options
	table    atomic.Pointer[Table]
	syncedAt atomic.Int64 // unix nanos of the last successful fetch
	changes  chan struct{}
}

// New returns a client and loads the persisted table, if any.
func New(o Options) *Client {
	cl := &Client{Options: o}
	if cl.HTTP == nil {
		cl.HTTP = &http.Client{}
	}
	if cl.Wait == 0 {
		cl.Wait = 30 * time.Second
	}
	cl.changes = make(chan struct{}, 1)
	if cl.StateFile != "" {
		if b, err := os.ReadFile(cl.StateFile); err == nil {
			var t Table
			if json.Unmarshal(b, &t) == nil {
				t.index()
				cl.table.Store(&t)
			}
		}
	}
	if cl.table.Load() == nil {
		t := &Table{}
		t.index()
		cl.table.Store(t)
	}
	return cl
}

// Table returns the current table (never nil).
func (c *Client) Table() *Table { return c.table.Load() }

// Set installs t (used by tests and by Run).
func (c *Client) Set(t *Table) {
	t.index()
	c.table.Store(t)
	c.syncedAt.Store(time.Now().UnixNano())
	select {
	case c.changes <- struct{}{}:
	default:
	}
}

// Staleness is the time since the last successful sync (or -1 if never).
func (c *Client) Staleness() time.Duration {
	s := c.syncedAt.Load()
	if s == 0 {
		return -1
	}
	return time.Since(time.Unix(0, s))
}

// Changes receives a value after each new table.
func (c *Client) Changes() <-chan struct{} { return c.changes }

// Run long-polls until ctx ends.
func (c *Client) Run(ctx context.Context) error {
	backoff := time.Duration(0)
	next := 0
	for ctx.Err() == nil {
		if len(c.Operators) == 0 {
			<-ctx.Done()
			return nil
		}
		op := c.Operators[next%len(c.Operators)]
		t, err := c.fetch(ctx, op, c.Table().Version)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			next++
			backoff = min(max(2*backoff, 200*time.Millisecond), 5*time.Second)
			c.Log.Warn("route table sync failed; serving the last known table", "operator", op.Host, "err", err, "stale_for", c.Staleness().Round(time.Second).String())
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		if t.Version != c.Table().Version {
			c.Set(t)
			c.persist(t)
		} else {
			c.syncedAt.Store(time.Now().UnixNano())
		}
	}
	return nil
}

func (c *Client) fetch(ctx context.Context, op *url.URL, have string) (*Table, error) {
	u := op.JoinPath("/api/v1/routes")
	u.RawQuery = url.Values{"version": {have}, "wait": {c.Wait.String()}}.Encode()
	ctx, cancel := context.WithTimeout(ctx, c.Wait+10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	req.Header.Set("Authorization", "Bearer "+c.Token)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	var t Table
	if err := json.NewDecoder(resp.Body).Decode(&t); err != nil {
		return nil, fmt.Errorf("bad route table: %w", err)
	}
	return &t, nil
}

func (c *Client) persist(t *Table) {
	if c.StateFile == "" {
		return
	}
	b, _ := json.Marshal(t)
	if err := os.MkdirAll(filepath.Dir(c.StateFile), 0o755); err == nil {
		_ = fsutil.WriteFile(c.StateFile, b, 0o644)
	}
}
