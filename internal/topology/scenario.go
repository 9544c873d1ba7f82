package topology

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

var mgmtHTTP = &http.Client{Timeout: 2 * time.Second}

// Leaders lists the operators (host names) that report holding the leader
// lock, among those the management network reaches.
func (t *Topology) Leaders(ctx context.Context) []string {
	var mu sync.Mutex
	var out []string
	var wg sync.WaitGroup
	for _, h := range t.Layout.All(RoleOperator) {
		p := t.Operators[h.Name]
		if p == nil || !p.Running() {
			continue
		}
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+h.IP+":8080/metrics", nil)
			resp, err := mgmtHTTP.Do(req)
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
		skip := false
		for _, a := range avoid {
			skip = skip || h.Region == a
		}
		if p := t.Operators[h.Name]; skip || p == nil || !p.Running() {
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
	Errors        []string // the first failures
	cancel        context.CancelFunc
	wg            sync.WaitGroup
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
				err := get(ctx, c.HTTP, url, want)
				if ctx.Err() != nil {
					return // stopped mid-request: not counted
				}
				l.Total.Add(1)
				if err != nil {
					l.Failed.Add(1)
					l.mu.Lock()
					if len(l.Errors) < 10 {
						l.Errors = append(l.Errors, fmt.Sprintf("%s from %s: %v", time.Now().Format("15:04:05.000"), c.ns, err))
					}
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

// VMs counts the microVM processes running on each worker of region i.
func (t *Topology) VMs(i int) map[string]int {
	out := map[string]int{}
	for _, h := range t.Layout.Regions[i].Of(RoleWorker) {
		for _, pid := range nsPIDs(h.Name) {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.HasPrefix(string(comm), "qemu") {
				out[h.Name]++
			}
		}
	}
	return out
}
