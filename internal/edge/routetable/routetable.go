// Package routetable keeps an edge proxy's copy of the operator's route
// table: it long-polls the operators (failing over between them), swaps in
// each new table atomically, persists the last one so a restarted edge
// serves at once, and keeps serving the last known table — reporting its
// age — while no operator answers.
package routetable

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	// Silence is how long a poll may go without a byte from its operator
	// before the client gives up on that operator and asks the next one
	// (default 6 s). An operator that writes heartbeats (every Silence/3)
	// is polled for Wait; one that does not (an older operator) for
	// Silence/2 at a time, so a lost operator is noticed within Silence
	// either way.
	Silence time.Duration
}

// Client follows the operators' route table.
type Client struct {
	Options
	table    atomic.Pointer[Table]
	syncedAt atomic.Int64 // unix nanos of the last successful fetch
	changes  chan struct{}
	// heartbeats records the operators (by host) seen to write
	// heartbeats, failedAt when each operator (by index) last failed a
	// poll; only Run's goroutine uses them.
	heartbeats map[string]bool
	failedAt   map[int]time.Time
}

// errSilent ends a poll whose operator went quiet for Options.Silence.
var errSilent = errors.New("the operator went silent")

// New returns a client and loads the persisted table, if any.
func New(o Options) *Client {
	cl := &Client{Options: o}
	if cl.HTTP == nil {
		cl.HTTP = &http.Client{}
	}
	if cl.Wait == 0 {
		cl.Wait = 30 * time.Second
	}
	if cl.Silence == 0 {
		cl.Silence = 6 * time.Second
	}
	cl.heartbeats = map[string]bool{}
	cl.failedAt = map[int]time.Time{}
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

// Run long-polls until ctx ends. Each poll goes to the first operator in
// the configured order (the edge's own region first) that has not failed
// a poll within retryAfter, else to the one that failed longest ago: a
// failed poll moves on at once, an edge that had to leave its region's
// operators returns to them once they answer again, and operators just
// lost (a region cut off, each costing a Silence) are not tried again in
// a row. Once the operators of a run of failures have all been tried, the
// next poll waits a backoff of up to 5 s.
func (c *Client) Run(ctx context.Context) error {
	backoff := time.Duration(0)
	failed := 0 // polls failed in a row
	for ctx.Err() == nil {
		if len(c.Operators) == 0 {
			<-ctx.Done()
			return nil
		}
		i := c.pick()
		op := c.Operators[i]
		t, err := c.fetch(ctx, op, c.Table().Version)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			c.failedAt[i] = time.Now()
			failed++
			c.Log.Warn("route table sync failed; serving the last known table", "operator", op.Host, "err", err, "stale_for", c.Staleness().Round(time.Second).String())
			if failed < len(c.Operators) {
				continue
			}
			backoff = min(max(2*backoff, 200*time.Millisecond), 5*time.Second)
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			continue
		}
		delete(c.failedAt, i)
		backoff, failed = 0, 0
		if t.Version != c.Table().Version {
			c.Set(t)
			c.persist(t)
		} else {
			c.syncedAt.Store(time.Now().UnixNano())
		}
	}
	return nil
}

// retryAfter is how long an operator that failed a poll is passed over
// while others have not failed.
func (c *Client) retryAfter() time.Duration { return 4 * c.Silence }

// pick returns the index of the operator to poll next.
func (c *Client) pick() int {
	oldest := 0
	for i := range c.Operators {
		at, failed := c.failedAt[i]
		if !failed || time.Since(at) >= c.retryAfter() {
			return i
		}
		if at.Before(c.failedAt[oldest]) {
			oldest = i
		}
	}
	return oldest
}

// fetch polls op once. Any Silence without a byte from op — before the
// response head or within the body — ends the poll with errSilent.
func (c *Client) fetch(ctx context.Context, op *url.URL, have string) (*Table, error) {
	wait := c.Wait
	if !c.heartbeats[op.Host] {
		// Not known to write heartbeats: ask for them, but wait only as
		// long as an answer without them may take.
		wait = min(wait, c.Silence/2)
	}
	q := url.Values{"version": {have}, "wait": {wait.String()}, "heartbeat": {(c.Silence / 3).String()}}
	u := op.JoinPath("/api/v1/routes")
	u.RawQuery = q.Encode()
	ctx, cancel := context.WithTimeout(ctx, wait+10*time.Second)
	defer cancel()
	ctx, silent := context.WithCancelCause(ctx)
	defer silent(nil)
	idle := time.AfterFunc(c.Silence, func() { silent(errSilent) })
	defer idle.Stop()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	req.Header.Set("Authorization", "Bearer "+c.Token)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		if errors.Is(context.Cause(ctx), errSilent) {
			return nil, fmt.Errorf("no answer for %s: %w", c.Silence, errSilent)
		}
		return nil, err
	}
	defer resp.Body.Close()
	idle.Reset(c.Silence)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	c.heartbeats[op.Host] = resp.Header.Get("Zeitwork-Heartbeat") != ""
	var t Table
	if err := json.NewDecoder(&idleReader{r: resp.Body, idle: idle, d: c.Silence}).Decode(&t); err != nil {
		if errors.Is(context.Cause(ctx), errSilent) {
			return nil, fmt.Errorf("nothing for %s while waiting: %w", c.Silence, errSilent)
		}
		return nil, fmt.Errorf("bad route table: %w", err)
	}
	return &t, nil
}

// idleReader restarts the silence timer on every byte read.
type idleReader struct {
	r    io.Reader
	idle *time.Timer
	d    time.Duration
}

func (r *idleReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.idle.Reset(r.d)
	}
	return n, err
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
