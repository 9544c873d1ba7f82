package topology

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

var mgmtHTTP = &http.Client{Timeout: 2 * time.Second}

// scrapeHTTP reads /metrics: the leader's scrape queries the database
// (deployment and node gauges, up to 5 s), which takes more than a second
// across the delayed links while microVMs boot.
var scrapeHTTP = &http.Client{Timeout: 10 * time.Second}

// Leaders lists the operators (host names) that report holding the leader
// lock, among those the management network reaches, skipping the regions
// listed in avoid (cut off: their scrapes would only time out).
func (t *Topology) Leaders(ctx context.Context, avoid ...int) []string {
	var mu sync.Mutex
	var out []string
	var wg sync.WaitGroup
	for _, h := range t.Layout.All(RoleOperator) {
		p := t.Operators[h.Name]
		if p == nil || !p.Running() || slices.Contains(avoid, h.Region) {
			continue
		}
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+h.IP+":8080/metrics", nil)
			resp, err := scrapeHTTP.Do(req)
			if err != nil {
				return
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			for _, line := range strings.Split(string(b), "\n") {
				if line == "zeitwork_operator_leader 1" {
					mu.Lock()
					out = append(out, h.Name)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	return out
}

// API returns an API client on the first operator that answers (in the
// layout's order, skipping the regions listed in avoid).
func (t *Topology) API(ctx context.Context, token string, avoid ...int) (*apiclient.Client, error) {
	for _, h := range t.Layout.All(RoleOperator) {
		if p := t.Operators[h.Name]; slices.Contains(avoid, h.Region) || p == nil || !p.Running() {
			continue
		}
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+h.IP+":8080/health/live", nil)
		resp, err := mgmtHTTP.Do(req)
		if err != nil {
			continue
		}
		resp.Body.Close()
		if resp.StatusCode == 200 {
			return apiclient.New("http://"+h.IP+":8080", token), nil
		}
	}
	return nil, fmt.Errorf("no operator answers")
}

// Load is constant, bounded load: each client sends one request every
// interval to url, until Stop or max requests per client.
type Load struct {
	Total, Failed atomic.Int64
	mu            sync.Mutex
	failures      []Failure
	cancel        context.CancelFunc
	wg            sync.WaitGroup
}

// Failure is one failed request of a Load.
type Failure struct {
	Start  time.Time // when the request was sent
	Client string    // the client's namespace
	Err    string
}

// Failures returns every failed request so far.
func (l *Load) Failures() []Failure {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.failures)
}

// StartLoad starts the load; want is a substring every good answer has.
func StartLoad(ctx context.Context, clients []*Client, url, want string, interval time.Duration, max int) *Load {
	ctx, cancel := context.WithCancel(ctx)
	l := &Load{cancel: cancel}
	for _, c := range clients {
		l.wg.Go(func() {
			t := time.NewTicker(interval)
			defer t.Stop()
			for range max {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				start := time.Now()
				err := get(ctx, c.HTTP, url, want)
				if ctx.Err() != nil {
					return // stopped mid-request: not counted
				}
				l.Total.Add(1)
				if err != nil {
					l.Failed.Add(1)
					l.mu.Lock()
					l.failures = append(l.failures, Failure{Start: start, Client: c.ns, Err: err.Error()})
					l.mu.Unlock()
				}
			}
		})
	}
	return l
}

// Stop ends the load and waits for the clients.
func (l *Load) Stop() {
	l.cancel()
	l.wg.Wait()
}

// Get fetches url with the client and checks for a 200 containing want.
func (c *Client) Get(ctx context.Context, url, want string) error {
	return get(ctx, c.HTTP, url, want)
}

func get(ctx context.Context, c *http.Client, url, want string) error {
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(b), want) {
		return fmt.Errorf("%d %q", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	return nil
}

// VMs counts the microVM processes running on each worker of region i
// by the instance they run (QEMU's -name zeitwork-<instance id>).
func (t *Topology) VMs(i int) map[string]int {
	out := map[string]int{}
	for _, h := range t.Layout.Regions[i].Of(RoleWorker) {
		for _, pid := range nsPIDs(h.Name) {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if err != nil {
				continue
			}
			args := strings.Split(string(b), "\x00")
			if len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "qemu") {
				continue
			}
			for j := 0; j+1 < len(args); j++ {
				if args[j] == "-name" {
					out[strings.TrimPrefix(args[j+1], "zeitwork-")]++
				}
			}
		}
	}
	return out
}

// WaitGet retries Get until it succeeds or within has passed (routes
// reach every edge a moment after a deployment turns active).
func (c *Client) WaitGet(ctx context.Context, url, want string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		err := c.Get(ctx, url, want)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// EdgesServing waits until every edge proxy of the layout answers host
// with a body containing want (on its HTTP port, from the management
// network): the route table has reached them all.
func (t *Topology) EdgesServing(ctx context.Context, host, want string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for _, h := range t.Layout.All(RoleWorker) {
		for {
			req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+h.IP+":8083/", nil)
			req.Host = host
			err := func() error {
				resp, err := mgmtHTTP.Do(req)
				if err != nil {
					return err
				}
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				if resp.StatusCode != 200 || !strings.Contains(string(b), want) {
					return fmt.Errorf("%d %q", resp.StatusCode, strings.TrimSpace(string(b)))
				}
				return nil
			}()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("edge on %s does not serve %s with %q: %v", h.Name, host, want, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return nil
}

// Routed counts the healthy instances per region that the route table (as
// the edges fetch it, from the first operator that answers outside the
// regions in avoid) lists for host.
func (t *Topology) Routed(ctx context.Context, host string, avoid ...int) (map[string]int, string, error) {
	api, err := t.API(ctx, t.ClusterToken, avoid...)
	if err != nil {
		return nil, "", err
	}
	var rt struct {
		Version string `json:"version"`
		Routes  []struct {
			Host      string `json:"host"`
			Instances []struct {
				Region  string `json:"region"`
				Healthy bool   `json:"healthy"`
			} `json:"instances"`
		} `json:"routes"`
	}
	if err := api.Do(ctx, "GET", "/api/v1/routes", nil, &rt); err != nil {
		return nil, "", err
	}
	out := map[string]int{}
	for _, r := range rt.Routes {
		if r.Host != host {
			continue
		}
		for _, in := range r.Instances {
			if in.Healthy {
				out[in.Region]++
			}
		}
	}
	return out, rt.Version, nil
}

// EdgesHave waits until every edge proxy outside the regions in skip
// serves the route table version (or a newer one: the operators' current
// table), as its /health reports.
func (t *Topology) EdgesHave(ctx context.Context, version string, within time.Duration, skip ...int) error {
	deadline := time.Now().Add(within)
	for _, r := range t.Layout.Regions {
		if slices.ContainsFunc(skip, func(i int) bool { return t.Layout.Regions[i] == r }) {
			continue
		}
		for _, h := range r.Of(RoleWorker) {
			for {
				have, err := edgeVersion(ctx, h.IP)
				if err == nil && have == version {
					break
				}
				if err == nil {
					if _, current, cerr := t.Routed(ctx, "", skip...); cerr == nil && have == current {
						break
					}
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("edge on %s serves route table %q, not %q (%v)", h.Name, have, version, err)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	return nil
}

// edgeVersion reads the route table version an edge serves from its /health.
func edgeVersion(ctx context.Context, ip string) (string, error) {
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+ip+":8083/health", nil)
	resp, err := mgmtHTTP.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var doc struct {
		Version string `json:"route_table_version"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return "", fmt.Errorf("edge at %s: /health: %w", ip, err)
	}
	return doc.Version, nil
}
