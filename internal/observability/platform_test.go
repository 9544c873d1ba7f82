package observability

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/devcluster"
	"github.com/zeitwork/zeitwork/internal/embeddedpg"
	"github.com/zeitwork/zeitwork/internal/operator/agents"
)

// The platform under test listens on its own loopback addresses and VM
// subnet, so that it runs beside `make dev` and the end-to-end suite
// (which use 127.0.0.1–127.0.3.x and 10.200–10.202.x.0/24): a node agent
// removes the taps of its subnet that it does not know.
const (
	testIP     = "127.0.91.1"
	testNodeIP = "127.0.91.11" // devcluster: node n of region 0 at FirstIP + 10 + n
	testSubnet = "10.241.0.0/24"
	testRegion = "obs"
)

// binDir returns a directory with the platform's binaries:
// $ZEITWORK_BIN_DIR (make test builds it first) or a fresh build.
func binDir(t *testing.T) string {
	if d := os.Getenv("ZEITWORK_BIN_DIR"); d != "" {
		if _, err := os.Stat(filepath.Join(d, "examples", "hello")); err == nil {
			return d
		}
	}
	d := t.TempDir()
	for _, b := range []string{"zeitwork-operator", "zeitwork-node-agent", "zeitwork-edge-proxy", "zeitwork-load-balancer", "zeitwork-init"} {
		goBuild(t, "./cmd/"+b, filepath.Join(d, b))
	}
	goBuild(t, "./examples/hello", filepath.Join(d, "examples", "hello"))
	return d
}

func goBuild(t *testing.T, pkg, out string) {
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
}

// fakeNode is a second worker of the test region that runs no VMs: it
// takes the operator's instances, reports them running and healthy in its
// heartbeats, and answers the edge's requests for them itself. The real
// node agent is drained, so the deployment lands here and no microVM
// boots; the real agent still reports its host and its own metrics.
type fakeNode struct {
	id       string
	srv      *httptest.Server
	operator string
	token    string

	mu    sync.Mutex
	insts map[string]agents.Instance
}

func startFakeNode(t *testing.T, operatorURL, token string) *fakeNode {
	n := &fakeNode{id: uuid.NewString(), operator: operatorURL, token: token, insts: map[string]agents.Instance{}}
	empty := promhttp.HandlerFor(prometheus.NewRegistry(), promhttp.HandlerOpts{})
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", empty)
	mux.Handle("GET /dataplane/metrics", empty)
	mux.HandleFunc("POST /instances", func(w http.ResponseWriter, r *http.Request) {
		var spec agents.Spec
		if err := json.NewDecoder(r.Body).Decode(&spec); err != nil || spec.ID == "" {
			http.Error(w, `{"error":{"code":"invalid_request","message":"bad spec"}}`, http.StatusBadRequest)
			return
		}
		n.mu.Lock()
		n.insts[spec.ID] = agents.Instance{ID: spec.ID, State: "running", Healthy: true, IP: "10.241.1.2"}
		n.mu.Unlock()
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write([]byte("{}"))
	})
	mux.HandleFunc("GET /instances", func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(n.list())
	})
	mux.HandleFunc("DELETE /instances/{id}", func(w http.ResponseWriter, r *http.Request) {
		n.mu.Lock()
		delete(n.insts, r.PathValue("id"))
		n.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	})
	n.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if id := r.Header.Get("X-Zeitwork-Instance"); id != "" { // the data plane
			_, _ = io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "hello from %s\n", id)
			return
		}
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(n.srv.Close)
	return n
}

func (n *fakeNode) list() []agents.Instance {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := []agents.Instance{}
	for _, in := range n.insts {
		out = append(out, in)
	}
	return out
}

// heartbeats reports to the operator every 500 ms until ctx ends.
func (n *fakeNode) heartbeats(ctx context.Context) {
	for ctx.Err() == nil {
		b, _ := json.Marshal(map[string]any{"id": n.id, "hostname": "fake-" + n.id[:8], "region": testRegion, "address": n.srv.URL,
			"vcpus": 8, "memory_mib": 8192, "instances": n.list(), "max_builds": 0, "builds": []any{}})
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, n.operator+"/api/v1/internal/nodes/"+n.id+"/heartbeat", bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+n.token)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// eventually polls cond every 200 ms until it holds or the deadline.
func eventually(t *testing.T, what string, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func get(ctx context.Context, u string) ([]byte, error) {
	status, b, err := fetch(ctx, u)
	if err == nil && status != 200 {
		err = fmt.Errorf("GET %s: %d %s", u, status, b)
	}
	return b, err
}

// familiesOf lists the metric families of a text exposition (its # TYPE
// lines).
func familiesOf(body []byte) map[string]bool {
	out := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 4 && f[0] == "#" && f[1] == "TYPE" {
			out[f[2]] = true
		}
	}
	return out
}

// TestPlatform starts the whole platform as real processes (one region,
// its real node agent drained and a fake node beside it, so nothing boots
// a VM), makes one deployment succeed and one fail, sends traffic through
// the load balancer, and then:
//   - scrapes /metrics of every binary: every family of Families is there
//     and `promtool check metrics` finds nothing wrong;
//   - checks the file_sd targets file the operator writes;
//   - runs a real Prometheus (Debian's binary) against the platform with
//     the shipped alert rules and that targets file, and runs every query
//     of every dashboard through its HTTP API: none may fail or come back
//     empty, and every rule must evaluate cleanly.
func TestPlatform(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the platform")
	}
	needPromtool(t)
	if _, err := exec.LookPath("prometheus"); err != nil {
		t.Fatal("prometheus is missing: install Debian's prometheus package (make deps)")
	}
	bin := binDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	state := t.TempDir()
	sdFile := filepath.Join(t.TempDir(), "targets", "nodes.json")
	started := time.Now()
	c, err := devcluster.Start(ctx, devcluster.Config{BinDir: bin, StateDir: state, Regions: []string{testRegion}, FirstIP: testIP,
		Env: map[string]string{"OBSERVABILITY_SD_FILE": sdFile, "VM_SUBNET": testSubnet, "NODE_DOWN_AFTER": "10m", "DEPLOY_TIMEOUT": "5m"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(state, "logs", "*.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				if len(b) > 3000 {
					b = b[len(b)-3000:]
				}
				t.Logf("--- %s (tail):\n%s", filepath.Base(l), b)
			}
		}
		_ = c.Stop()
		c.StopVMs()
	})
	t.Logf("platform up in %s", time.Since(started).Round(time.Millisecond))

	// A streaming standby of the cluster's database, so that the
	// operator measures a real replication lag.
	standbyDir := filepath.Join(state, "standby", "data")
	if err := PostgresDir(standbyDir); err != nil {
		t.Fatal(err)
	}
	if _, err := PGTool(ctx, "pg_basebackup", "-h", "127.0.0.1", "-p", strconv.Itoa(c.DB.Port()), "-U", "zeitwork",
		"-D", standbyDir, "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"); err != nil {
		t.Fatal(err)
	}
	standby, err := embeddedpg.Start(ctx, embeddedpg.Config{DataDir: standbyDir, Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = standby.Close() })

	token, err := c.Bootstrap(ctx, "obs", "ops@zeitwork.test")
	if err != nil {
		t.Fatal(err)
	}
	api := apiclient.New(c.OperatorURL, token)
	admin := apiclient.New(c.OperatorURL, c.ClusterToken)
	fake := startFakeNode(t, c.OperatorURL, c.ClusterToken)
	hbCtx, stopHB := context.WithCancel(ctx)
	var bg sync.WaitGroup
	t.Cleanup(func() { stopHB(); bg.Wait() })
	bg.Go(func() { fake.heartbeats(hbCtx) })

	type node struct {
		ID, Address, State string
	}
	var realNode node
	eventually(t, "both nodes registered", time.Minute, func() error {
		var doc struct {
			Nodes []node `json:"nodes"`
		}
		if err := api.Do(ctx, "GET", "/api/v1/nodes", nil, &doc); err != nil {
			return err
		}
		nodes := doc.Nodes
		for _, n := range nodes {
			if strings.Contains(n.Address, testNodeIP) {
				realNode = n
			}
		}
		if len(nodes) != 2 || realNode.ID == "" {
			return fmt.Errorf("nodes: %+v", nodes)
		}
		return nil
	})
	if err := admin.Do(ctx, "POST", "/api/v1/nodes/"+realNode.ID+"/drain", nil, nil); err != nil {
		t.Fatalf("drain the real node: %v", err)
	}

	// The operator's targets file lists both nodes with their region.
	eventually(t, "targets file", time.Minute, func() error {
		b, err := os.ReadFile(sdFile)
		if err != nil {
			return err
		}
		var groups []struct {
			Targets []string          `json:"targets"`
			Labels  map[string]string `json:"labels"`
		}
		if err := json.Unmarshal(b, &groups); err != nil {
			return err
		}
		found := map[string]bool{}
		for _, g := range groups {
			if g.Labels["region"] != testRegion || len(g.Targets) != 1 {
				return fmt.Errorf("group %+v", g)
			}
			found[g.Labels["node_id"]] = g.Targets[0] == testNodeIP+":8081" || g.Targets[0] == strings.TrimPrefix(fake.srv.URL, "http://")
		}
		if len(groups) != 2 || !found[realNode.ID] || !found[fake.id] {
			return fmt.Errorf("targets file: %s", b)
		}
		return nil
	})

	// Prometheus starts before anything happens, so that it sees the
	// counters move.
	promDir := t.TempDir()
	rulesGlob, _ := filepath.Abs(filepath.Join(kit, "rules", "*.yml"))
	cfg := fmt.Sprintf(`global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 2s}
rule_files: [%q]
scrape_configs:
  - job_name: zeitwork-operator
    static_configs: [{targets: ["%[2]s:8080"]}]
  - job_name: zeitwork-node-agent
    file_sd_configs: [{files: [%[3]q], refresh_interval: 2s}]
  - job_name: zeitwork-dataplane
    metrics_path: /dataplane/metrics
    file_sd_configs: [{files: [%[3]q], refresh_interval: 2s}]
  - job_name: zeitwork-edge-proxy
    static_configs: [{targets: ["%[2]s:8083"], labels: {region: %[4]s}}]
  - job_name: zeitwork-load-balancer
    static_configs: [{targets: ["%[2]s:8084"], labels: {region: %[4]s}}]
`, rulesGlob, testIP, sdFile, testRegion)
	cfgFile := filepath.Join(promDir, "prometheus.yml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Promtool(ctx, nil, "check", "config", cfgFile); err != nil {
		t.Fatal(err)
	}
	prom, err := StartPrometheus(ctx, cfgFile, filepath.Join(promDir, "data"), filepath.Join(promDir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(promDir, "prometheus.log"))
			t.Logf("--- prometheus.log:\n%s", b)
		}
		prom.Stop()
	})
	eventually(t, "every target scraped", 2*time.Minute, func() error {
		ts, err := prom.Targets(ctx)
		if err != nil {
			return err
		}
		jobs := map[string]int{}
		for _, tg := range ts {
			if tg.Health != "up" {
				return fmt.Errorf("%s %s: %s %s", tg.Job, tg.ScrapeURL, tg.Health, tg.LastError)
			}
			if tg.Job == "zeitwork-node-agent" && strings.Contains(tg.ScrapeURL, testNodeIP) &&
				(tg.Labels["region"] != testRegion || tg.Labels["node_id"] != realNode.ID) {
				return fmt.Errorf("node agent target labels %v", tg.Labels)
			}
			jobs[tg.Job]++
		}
		if len(jobs) != 5 || jobs["zeitwork-node-agent"] != 2 || jobs["zeitwork-dataplane"] != 2 {
			return fmt.Errorf("targets by job: %v", jobs)
		}
		return nil
	})

	// One deployment that succeeds (on the fake node), one that fails
	// (its image does not exist).
	ref, err := c.Registry.PushSample(ctx, "obs/hello", "v1", devcluster.SampleImage{Binary: filepath.Join(bin, "examples", "hello"), User: "1000:1000"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"hello", "broken"} {
		if err := api.Do(ctx, "POST", "/api/v1/projects", map[string]any{"name": p, "port": 8080, "health_path": "/healthz", "min_instances_per_region": 1}, nil); err != nil {
			t.Fatal(err)
		}
	}
	var good, bad apiclient.Deployment
	if err := api.Do(ctx, "POST", "/api/v1/projects/hello/deployments", map[string]string{"image": ref}, &good); err != nil {
		t.Fatal(err)
	}
	if err := api.Do(ctx, "POST", "/api/v1/projects/broken/deployments", map[string]string{"image": c.Registry.Addr + "/obs/missing:v1"}, &bad); err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		d    *apiclient.Deployment
		want string
	}{{&good, "active"}, {&bad, "failed"}} {
		eventually(t, "deployment "+w.want, 3*time.Minute, func() error {
			if err := api.Do(ctx, "GET", "/api/v1/deployments/"+w.d.ID, nil, w.d); err != nil {
				return err
			}
			if w.d.Status != w.want {
				return fmt.Errorf("status %s (%s)", w.d.Status, w.d.FailureReason)
			}
			return nil
		})
	}

	// Traffic through the load balancer (HTTP listener :8085 → edge
	// :8083): the deployment's host (served by the fake node) and a host
	// nobody owns.
	host := strings.TrimPrefix(good.URL, "https://")
	lb := &http.Client{Timeout: 10 * time.Second}
	request := func(h string) (int, error) {
		req, _ := http.NewRequestWithContext(hbCtx, http.MethodGet, "http://"+testIP+":8085/", nil)
		req.Host = h
		resp, err := lb.Do(req)
		if err != nil {
			return 0, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	eventually(t, "the deployment answers through the load balancer", time.Minute, func() error {
		if code, err := request(host); err != nil || code != 200 {
			return fmt.Errorf("%d %v", code, err)
		}
		return nil
	})
	bg.Go(func() {
		for hbCtx.Err() == nil {
			_, _ = request(host)
			_, _ = request("nobody.example")
			_ = api.Do(hbCtx, "GET", "/api/v1/deployments/"+good.ID, nil, nil)
			select {
			case <-hbCtx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	})

	t.Run("scrapes", func(t *testing.T) {
		scrapes := map[string]string{
			"zeitwork-operator":      "http://" + testIP + ":8080/metrics",
			"zeitwork-node-agent":    "http://" + testNodeIP + ":8081/metrics",
			"zeitwork-dataplane":     "http://" + testNodeIP + ":8081/dataplane/metrics",
			"zeitwork-edge-proxy":    "http://" + testIP + ":8083/metrics",
			"zeitwork-load-balancer": "http://" + testIP + ":8084/metrics",
		}
		jobs := make([]string, 0, len(scrapes))
		for j := range scrapes {
			jobs = append(jobs, j)
		}
		sort.Strings(jobs)
		for _, job := range jobs {
			var body []byte
			var missing []string
			// The operator's replication lag appears once the standby
			// has replayed something; give every scrape a little time.
			eventually(t, job+" exports every family", time.Minute, func() error {
				b, err := get(ctx, scrapes[job])
				if err != nil {
					return err
				}
				have := familiesOf(b)
				missing = missing[:0]
				for _, f := range Families[job] {
					if !have[f] {
						missing = append(missing, f)
					}
				}
				if job == "zeitwork-operator" && !bytes.Contains(b, []byte("zeitwork_db_replication_lag_known 1")) {
					missing = append(missing, "zeitwork_db_replication_lag_known 1 (the standby's lag)")
				}
				body = b
				if len(missing) > 0 {
					return fmt.Errorf("missing %v", missing)
				}
				return nil
			})
			// Lint problems fail too: every name is ours to fix, and the
			// conventions (units, _total on counters only, help text) are
			// what dashboards and alerts across services rely on.
			problems, err := CheckMetrics(ctx, body)
			if err != nil {
				t.Errorf("%s: %v", job, err)
			}
			for _, p := range problems {
				t.Errorf("%s: promtool check metrics: %s", job, p)
			}
			t.Logf("%s: %d families, %d bytes, %d promtool problems", job, len(familiesOf(body)), len(body), len(problems))
		}
	})

	t.Run("dashboards", func(t *testing.T) {
		ds, err := LoadDashboards(filepath.Join(kit, "grafana", "dashboards"))
		if err != nil {
			t.Fatal(err)
		}
		vars := map[string]string{"region": testRegion, "deployment": good.ID, "__rate_interval": "20s", "__interval": "2s", "datasource": "prometheus"}
		// Rates need two samples in their window; wait for the edge's.
		eventually(t, "edge request rate in Prometheus", 2*time.Minute, func() error {
			s, err := prom.Query(ctx, `sum(rate(zeitwork_edge_proxy_requests_total{code="2xx"}[20s])) > 0`)
			if err == nil && len(s) == 0 {
				err = errors.New("no 2xx rate yet")
			}
			return err
		})
		n, nan := 0, 0
		for _, d := range ds {
			qs, err := d.Queries()
			if err != nil {
				t.Fatal(err)
			}
			for _, q := range qs {
				expr, err := Expand(q.Expr, vars)
				if err != nil {
					t.Errorf("%s: %v", q.Where, err)
					continue
				}
				n++
				var res []Sample
				deadline := time.Now().Add(30 * time.Second)
				for {
					res, err = prom.Query(ctx, expr)
					if err != nil || len(res) > 0 || time.Now().After(deadline) {
						break
					}
					time.Sleep(time.Second)
				}
				switch {
				case err != nil:
					t.Errorf("%s: %v", q.Where, err)
				case len(res) == 0:
					t.Errorf("%s: no data for %s", q.Where, expr)
				default:
					allNaN := true
					for _, s := range res {
						if !math.IsNaN(s.Value) {
							allNaN = false
						}
					}
					if allNaN {
						nan++
						t.Logf("%s: only NaN (nothing observed yet): %s", q.Where, expr)
					}
				}
			}
		}
		t.Logf("%d dashboard queries against Prometheus, %d answered NaN only (histograms without observations)", n, nan)
		rules, bad, err := prom.RuleHealth(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range bad {
			t.Errorf("rule: %s", b)
		}
		if rules == 0 {
			t.Error("Prometheus loaded no rules")
		}
	})
}
