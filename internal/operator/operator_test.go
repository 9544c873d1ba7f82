package operator

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/uuid"

	"github.com/zeitwork/zeitwork/internal/httpjson"
	ib "github.com/zeitwork/zeitwork/internal/imagebuild"
	"github.com/zeitwork/zeitwork/internal/operator/agents/agenttest"
	"github.com/zeitwork/zeitwork/internal/operator/domains/dnstest"
	"github.com/zeitwork/zeitwork/internal/operator/routes"
	"github.com/zeitwork/zeitwork/internal/pgtest"
)

const clusterToken = "cluster-secret"

type env struct {
	t         testing.TB
	url       string
	ops       []*Operator
	agents    []*agenttest.Agent
	reg       string
	images    map[string]string
	cfg       Config
	dns       *dnstest.Server
	stopFirst func() // ends the first operator's background work
}

func testConfig(dbURL string) Config {
	return Config{DatabaseURL: dbURL, ClusterToken: clusterToken, EncryptionKey: "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
		WebhookSecret: "whsec", AppsDomain: "zeitwork.test", EdgeHostname: "edge.zeitwork.test", DeployTimeout: 10 * time.Second,
		Retention: time.Hour, NodeDownAfter: 2 * time.Second, ReconcileEvery: 200 * time.Millisecond, DomainRecheck: time.Hour,
		OrphanScanEvery: 300 * time.Millisecond, AdminOrgs: []string{"acme"}}
}

func startOperator(t testing.TB, cfg Config) (*Operator, string) {
	op, url, _ := startStoppableOperator(t, cfg)
	return op, url
}

// tailLog keeps an operator's last log lines and prints them if the test
// fails.
func tailLog(t testing.TB) io.Writer {
	l := &logTail{}
	t.Cleanup(func() {
		if t.Failed() {
			l.mu.Lock()
			defer l.mu.Unlock()
			t.Logf("the operator's last %d log lines:\n%s", len(l.lines), strings.Join(l.lines, ""))
		}
	})
	return l
}

type logTail struct {
	mu    sync.Mutex
	lines []string
}

func (l *logTail) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lines) == 200 {
		l.lines = slices.Delete(l.lines, 0, 1)
	}
	l.lines = append(l.lines, string(p))
	return len(p), nil
}

// startStoppableOperator also returns a function that ends the operator's
// background work (as if its process died) while its API keeps serving.
func startStoppableOperator(t testing.TB, cfg Config) (*Operator, string, func()) {
	pool := pgtestPool(t, cfg.DatabaseURL)
	op, err := New(cfg, pool, nil, slog.New(slog.NewTextHandler(tailLog(t), nil)))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(op.Handler(http.NotFoundHandler()))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = op.Run(ctx); close(done) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(func() { srv.Close(); stop() })
	return op, srv.URL, stop
}

func newEnv(t testing.TB, configure ...func(*Config)) *env {
	dbURL := pgtest.URL(t)
	e := &env{t: t, images: map[string]string{}, dns: dnstest.Start(t)}
	e.cfg = testConfig(dbURL)
	e.cfg.DNSResolver = e.dns.Addr
	for _, f := range configure {
		f(&e.cfg)
	}
	op, url, stop := startStoppableOperator(t, e.cfg)
	e.ops, e.url, e.stopFirst = []*Operator{op}, url, stop
	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(reg.Close)
	e.reg = strings.TrimPrefix(reg.URL, "http://")
	for _, v := range []string{"v1", "v2", "v3-broken", "abc1234"} {
		l, _ := ib.Layer(ib.Entry{Name: "version", Data: []byte(v)})
		img, _ := ib.Image(ib.Config{Cmd: []string{"/app"}}, l)
		ref, err := ib.Push(t.Context(), e.reg+"/acme/web:"+v, img)
		if err != nil {
			t.Fatal(err)
		}
		e.images[v] = ref
	}
	bad := func(image string) bool { return strings.Contains(image, strings.Split(e.images["v3-broken"], "@")[1]) }
	for _, region := range []string{"us-east", "eu-west", "ap-south"} {
		for range 2 {
			e.agents = append(e.agents, agenttest.Start(t, region, url, clusterToken, bad))
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			for _, a := range e.agents {
				a.Heartbeat()
			}
			time.Sleep(150 * time.Millisecond)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
	// Tests start once every node is known (a loaded machine can delay
	// the first heartbeats past a test's first node call).
	e.eventually("every agent registered", func() bool {
		var n int
		_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT count(*) FROM nodes").Scan(&n)
		return n == len(e.agents)
	})
	return e
}

func (e *env) call(token, method, path string, body any, out any, hdr ...string) int {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, e.url+path, rd)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			e.t.Fatalf("%s %s: %d %s", method, path, resp.StatusCode, b)
		}
	}
	return resp.StatusCode
}

func (e *env) waitDeployment(tok, id string, want ...string) Deployment {
	e.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		var d Deployment
		e.call(tok, "GET", "/api/v1/deployments/"+id, nil, &d)
		for _, w := range want {
			if d.Status == w {
				return d
			}
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("deployment %s is %s (%s), want %v", id, d.Status, d.FailureReason, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// deployOnePerRegion creates project web (one instance per region),
// deploys v1 and waits until it is active with its 3 instances.
func (e *env) deployOnePerRegion(tok string) Deployment {
	e.t.Helper()
	if code := e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "min_instances_per_region": 1}, nil); code != 201 {
		e.t.Fatalf("create project: %d", code)
	}
	var d Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v1"]}, &d); code != 202 {
		e.t.Fatalf("deploy: %d", code)
	}
	if d = e.waitDeployment(tok, d.ID.String(), "active", "failed"); d.Status != "active" || len(d.Instances) != 3 {
		e.t.Fatalf("deploy: %s %q", d.Status, d.FailureReason)
	}
	return d
}

// eventually polls cond for up to a minute.
func (e *env) eventually(what string, cond func() bool) {
	e.t.Helper()
	for deadline := time.Now().Add(60 * time.Second); !cond(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out waiting: %s", what)
		}
	}
}

func (e *env) agentOf(nodeID uuid.UUID) *agenttest.Agent {
	for _, a := range e.agents {
		if a.ID == nodeID.String() {
			return a
		}
	}
	e.t.Fatalf("no agent %s", nodeID)
	return nil
}

func (e *env) instanceRows(dep uuid.UUID) int {
	var n int
	if err := e.ops[0].pool.QueryRow(e.t.Context(), "SELECT count(*) FROM instances WHERE deployment_id = $1", dep).Scan(&n); err != nil {
		e.t.Fatal(err)
	}
	return n
}

func (e *env) logs(tok string, dep uuid.UUID) []map[string]any {
	e.t.Helper()
	req, _ := http.NewRequest("GET", e.url+"/api/v1/deployments/"+dep.String()+"/logs", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != 200 || ct != "application/x-ndjson" {
		e.t.Fatalf("logs: %d %s", resp.StatusCode, ct)
	}
	var out []map[string]any
	dec := json.NewDecoder(resp.Body)
	for {
		var l map[string]any
		if err := dec.Decode(&l); err == io.EOF {
			return out
		} else if err != nil {
			e.t.Fatal(err)
		}
		out = append(out, l)
	}
}

func (e *env) routeFor(host string) *routes.Route {
	e.t.Helper()
	var rt routes.Table
	if code := e.call(clusterToken, "GET", "/api/v1/routes", nil, &rt); code != 200 {
		e.t.Fatalf("routes: %d", code)
	}
	for _, r := range rt.Routes {
		if r.Host == host {
			return &r
		}
	}
	return nil
}

func TestAPIAuthAndValidation(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, err := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := e.ops[0].Bootstrap(t.Context(), "other", "ops@other.test", "t")
	var apiErr httpjson.ErrorBody
	if code := e.call("", "GET", "/api/v1/projects", nil, &apiErr); code != 401 || apiErr.Error.Code != "unauthorized" {
		t.Fatalf("no token: %d %+v", code, apiErr)
	}
	if code := e.call("zw_bogus", "GET", "/api/v1/projects", nil, nil); code != 401 {
		t.Fatalf("bad token: %d", code)
	}
	var p Project
	if code := e.call(a, "POST", "/api/v1/projects", map[string]any{"name": "web", "port": 8080}, &p); code != 201 {
		t.Fatalf("create project: %d", code)
	}
	for _, tc := range []struct{ body, want string }{
		{`{"name": "Web_App"}`, "DNS label"},
		{`{"name": "` + strings.Repeat("a", 64) + `"}`, "63"},
		{`{"name": "x", "bogus": 1}`, "unknown field"},
		{`{"name": `, "malformed JSON"},
		{`{"name": "y", "port": 0, "health_path": "nope"}`, "port must be"},
	} {
		var ae httpjson.ErrorBody
		if code := e.call(a, "POST", "/api/v1/projects", tc.body, &ae); code != 400 || !strings.Contains(ae.Error.Message, tc.want) {
			t.Errorf("%s: %d %+v", tc.body, code, ae)
		}
	}
	if code := e.call(a, "POST", "/api/v1/projects", map[string]any{"name": "web"}, nil); code != 409 {
		t.Fatalf("duplicate project: %d", code)
	}
	// Another org's token sees nothing of acme's: 404, not 403.
	if code := e.call(b, "GET", "/api/v1/projects/"+p.ID.String(), nil, nil); code != 404 {
		t.Fatalf("foreign project: %d", code)
	}
	if code := e.call(b, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v1"]}, nil); code != 404 {
		t.Fatalf("foreign deploy: %d", code)
	}
	// Env vars are write-only.
	if code := e.call(a, "PUT", "/api/v1/projects/web/env", map[string]any{"vars": map[string]string{"DB_PASSWORD": "hunter2"}}, nil); code != 200 {
		t.Fatalf("set env: %d", code)
	}
	var envList map[string]any
	e.call(a, "GET", "/api/v1/projects/web/env", nil, &envList)
	if s := fmt.Sprint(envList); strings.Contains(s, "hunter2") || !strings.Contains(s, "DB_PASSWORD") {
		t.Fatalf("env listing: %s", s)
	}
	var stored []byte
	_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT ciphertext FROM project_env_vars").Scan(&stored)
	if bytes.Contains(stored, []byte("hunter2")) {
		t.Fatal("secret stored in plain text")
	}
	// Idempotency-Key: the same POST twice gives one deployment.
	var d1, d2 Deployment
	e.call(a, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v1"]}, &d1, "Idempotency-Key", "k1")
	e.call(a, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v1"]}, &d2, "Idempotency-Key", "k1")
	if d1.ID != d2.ID || d1.ID == uuid.Nil {
		t.Fatalf("idempotency: %s vs %s", d1.ID, d2.ID)
	}
	if code := e.call(a, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": "other"}, nil, "Idempotency-Key", "k1"); code != 409 {
		t.Fatalf("reused key for another request: %d", code)
	}
	// Nodes are shared: only admin organisations (or the cluster token)
	// change them.
	var ae2 httpjson.ErrorBody
	if code := e.call(b, "POST", "/api/v1/nodes/"+e.agents[0].ID+"/drain", nil, &ae2); code != 403 || ae2.Error.Code != "forbidden" {
		t.Fatalf("drain by a non-admin org: %d %+v", code, ae2)
	}
	if code := e.call(clusterToken, "POST", "/api/v1/nodes/"+e.agents[0].ID+"/enable", nil, nil); code != 200 {
		t.Fatalf("enable with the cluster token: %d", code)
	}
	if code := e.call("", "POST", "/api/v1/nodes/"+e.agents[0].ID+"/drain", nil, nil); code != 401 {
		t.Fatalf("drain without a token: %d", code)
	}
	// Nothing half-written: a rejected project left no row.
	var n int
	_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT count(*) FROM projects").Scan(&n)
	if n != 1 {
		t.Fatalf("%d project rows, want 1", n)
	}

	// Tokens: shown once, listed without secrets, revocable.
	var created struct {
		ID    string `json:"id"`
		Token string `json:"token"`
	}
	if code := e.call(a, "POST", "/api/v1/tokens", map[string]any{"name": "ci"}, &created); code != 201 || !strings.HasPrefix(created.Token, "zw_") {
		t.Fatalf("create token: %d %+v", code, created)
	}
	var tokens map[string]any
	e.call(a, "GET", "/api/v1/tokens", nil, &tokens)
	if s := fmt.Sprint(tokens); strings.Contains(s, created.Token) || !strings.Contains(s, "ci") {
		t.Fatalf("token listing: %s", s)
	}
	if code := e.call(created.Token, "GET", "/api/v1/projects/web", nil, nil); code != 200 {
		t.Fatalf("new token: %d", code)
	}
	if code := e.call(b, "DELETE", "/api/v1/tokens/"+created.ID, nil, nil); code != 404 {
		t.Fatalf("other org revoking a token: %d", code)
	}
	if code := e.call(a, "DELETE", "/api/v1/tokens/"+created.ID, nil, nil); code != 204 {
		t.Fatalf("revoke: %d", code)
	}
	if code := e.call(created.Token, "GET", "/api/v1/projects/web", nil, nil); code != 401 {
		t.Fatalf("revoked token: %d", code)
	}

	// Members: added, listed, removed; the last owner stays.
	var member map[string]any
	if code := e.call(a, "POST", "/api/v1/members", map[string]any{"email": "dev@acme.test"}, &member); code != 201 {
		t.Fatalf("add member: %d", code)
	}
	if code := e.call(a, "POST", "/api/v1/members", map[string]any{"email": "nope"}, nil); code != 400 {
		t.Fatalf("bad member email: %d", code)
	}
	var members struct {
		Members []struct {
			ID    string `json:"id"`
			Email string `json:"email"`
			Role  string `json:"role"`
		} `json:"members"`
	}
	e.call(a, "GET", "/api/v1/members", nil, &members)
	if len(members.Members) != 2 {
		t.Fatalf("members: %+v", members)
	}
	for _, m := range members.Members {
		want := 204
		if m.Role == "owner" {
			want = 409
		}
		if code := e.call(a, "DELETE", "/api/v1/members/"+m.ID, nil, nil); code != want {
			t.Fatalf("remove %s (%s): %d, want %d", m.Email, m.Role, code, want)
		}
	}

	// A new organisation gets its own first token and sees nothing of acme.
	var org struct {
		Name  string `json:"name"`
		Token string `json:"token"`
	}
	if code := e.call(a, "POST", "/api/v1/organisations", map[string]any{"name": "acme-labs", "owner_email": "ops@acme.test"}, &org); code != 201 {
		t.Fatalf("create org: %d", code)
	}
	if code := e.call(a, "POST", "/api/v1/organisations", map[string]any{"name": "acme-labs", "owner_email": "ops@acme.test"}, nil); code != 409 {
		t.Fatalf("duplicate org: %d", code)
	}
	var projects struct {
		Projects []Project `json:"projects"`
	}
	if code := e.call(org.Token, "GET", "/api/v1/projects", nil, &projects); code != 200 || len(projects.Projects) != 0 {
		t.Fatalf("new org's projects: %d %+v", code, projects)
	}
	if code := e.call(org.Token, "GET", "/api/v1/deployments/"+d1.ID.String(), nil, nil); code != 404 {
		t.Fatalf("new org reading acme's deployment: %d", code)
	}
}

func sign(body []byte) string {
	m := hmac.New(sha256.New, []byte("whsec"))
	m.Write(body)
	return "sha256=" + hex.EncodeToString(m.Sum(nil))
}

// TestDeploymentLifecycle drives deployments across 3 regions × 2 nodes:
// placement, health-gated cut-over, failure, rollback, node loss, webhooks.
func TestDeploymentLifecycle(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	// A second operator on the same database: the reconciler must still
	// place every instance exactly once.
	op2, _ := startOperator(t, e.cfg)
	e.ops = append(e.ops, op2)
	e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "github_repo": "acme/web", "github_branch": "main",
		"image_template": e.reg + "/acme/web:{sha}", "min_instances_per_region": 3, "health_path": "/healthz"}, nil)

	var v1 Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v1"]}, &v1); code != 202 {
		t.Fatalf("deploy: %d", code)
	}
	v1 = e.waitDeployment(tok, v1.ID.String(), "active")
	if len(v1.Regions) != 3 {
		t.Fatalf("regions: %+v", v1.Regions)
	}
	perNode := map[uuid.UUID]int{}
	for r, ri := range v1.Regions {
		if ri.Desired != 3 || ri.Healthy != 3 {
			t.Fatalf("region %s: %+v", r, ri)
		}
	}
	for _, in := range v1.Instances {
		perNode[in.NodeID]++
	}
	if len(perNode) != 6 {
		t.Fatalf("instances not spread over all 6 nodes: %v", perNode)
	}
	// Two operators ran: every instance was created on exactly one node.
	for _, in := range v1.Instances {
		on := 0
		for _, a := range e.agents {
			if a.CreatesOf(in.ID.String()) > 0 {
				on++
			}
		}
		if on != 1 || e.agentOf(in.NodeID).CreatesOf(in.ID.String()) == 0 {
			t.Fatalf("instance %s created on %d nodes", in.ID, on)
		}
	}
	if total := e.instanceRows(v1.ID); total != 9 {
		t.Fatalf("%d instance rows for v1, want 9", total)
	}
	alias := "web-acme.zeitwork.test"
	if r := e.routeFor(alias); r == nil || r.DeploymentID != v1.ID || len(r.Instances) != 9 {
		t.Fatalf("alias route: %+v", r)
	}
	if r := e.routeFor(v1.Hostname); r == nil || r.Kind != "versioned" {
		t.Fatalf("versioned route: %+v", r)
	}

	// The route table needs the cluster token; a long poll with the
	// current version returns when routing changes (v2 below), and a poll
	// with nothing changing returns the same version after its wait.
	if code := e.call("zw_user", "GET", "/api/v1/routes", nil, nil); code != 401 {
		t.Fatalf("routes without the cluster token: %d", code)
	}
	if code := e.call(clusterToken, "GET", "/api/v1/routes?wait=soon", nil, nil); code != 400 {
		t.Fatalf("malformed wait: %d", code)
	}
	var cur routes.Table
	e.call(clusterToken, "GET", "/api/v1/routes", nil, &cur)
	var same routes.Table
	if e.call(clusterToken, "GET", "/api/v1/routes?version="+cur.Version+"&wait=300ms", nil, &same); same.Version != cur.Version {
		t.Fatalf("idle long poll changed version %s → %s", cur.Version, same.Version)
	}
	// With heartbeat=H the head comes at once and a space every H
	// precedes the table, which still decodes.
	{
		req, _ := http.NewRequest("GET", e.url+"/api/v1/routes?version="+cur.Version+"&wait=700ms&heartbeat=200ms", nil)
		req.Header.Set("Authorization", "Bearer "+clusterToken)
		start := time.Now()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		head := time.Since(start)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var hb routes.Table
		if resp.Header.Get("Zeitwork-Heartbeat") != "200ms" || head > 500*time.Millisecond ||
			!strings.HasPrefix(string(body), "   ") || json.Unmarshal(body, &hb) != nil || hb.Version != cur.Version {
			t.Fatalf("long poll with heartbeats: head after %s, %v, body %.40q", head, resp.Header, body)
		}
	}
	polled := make(chan routes.Table, 1)
	go func() { // no t.Fatal off the test goroutine: a failure shows as an empty table
		var rt routes.Table
		req, _ := http.NewRequest("GET", e.url+"/api/v1/routes?version="+cur.Version+"&wait=60s", nil)
		req.Header.Set("Authorization", "Bearer "+clusterToken)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			_ = json.NewDecoder(resp.Body).Decode(&rt)
			resp.Body.Close()
		}
		polled <- rt
	}()

	// v2 cuts over only once healthy.
	var v2 Deployment
	e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v2"]}, &v2)
	for {
		// Route first, then status: the alias moves in the transaction that
		// makes v2 active, so a moved alias must be followed by "active",
		// and v2 must have passed its health checks before.
		r := e.routeFor(alias)
		d := e.waitDeployment(tok, v2.ID.String(), "pending", "preparing", "starting", "healthy", "active")
		if r.DeploymentID != v1.ID && (d.Status != "active" || d.HealthyAt == nil || d.Regions["us-east"].Healthy < 3) {
			t.Fatalf("alias moved to %s while v2 is %s (healthy at %v, %+v)", r.DeploymentID, d.Status, d.HealthyAt, d.Regions)
		}
		if d.Status == "active" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if r := e.routeFor(alias); r.DeploymentID != v2.ID {
		t.Fatal("alias not on v2")
	}
	select {
	case rt := <-polled:
		if rt.Version == cur.Version || len(rt.Routes) <= len(cur.Routes) {
			t.Fatalf("long poll returned version %s with %d routes (had %s, %d)", rt.Version, len(rt.Routes), cur.Version, len(cur.Routes))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("long poll did not return after routing changed")
	}
	if r := e.routeFor(v1.Hostname); r == nil {
		t.Fatal("v1 no longer reachable on its own URL")
	}

	// A broken v3 never receives traffic and fails with a reason.
	var v3 Deployment
	e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v3-broken"]}, &v3)
	v3 = e.waitDeployment(tok, v3.ID.String(), "failed", "active")
	if v3.Status != "failed" || !strings.Contains(v3.FailureReason, "health check") {
		t.Fatalf("v3: %s %q", v3.Status, v3.FailureReason)
	}
	if r := e.routeFor(alias); r.DeploymentID != v2.ID {
		t.Fatal("alias left v2 for a failed deployment")
	}

	// Rollback goes back to v1 at once (its VMs still run).
	var rb Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/rollback", map[string]any{"deployment_id": v1.ID.String()}, &rb); code != 200 {
		t.Fatalf("rollback: %d", code)
	}
	if r := e.routeFor(alias); r.DeploymentID != v1.ID {
		t.Fatalf("rollback did not switch the alias: %s", r.DeploymentID)
	}

	// Logs of every instance, merged as NDJSON with instance and region.
	logs := e.logs(tok, v1.ID)
	if len(logs) != 9 {
		t.Fatalf("%d log lines, want 9: %v", len(logs), logs)
	}
	for _, l := range logs {
		if !strings.HasPrefix(l["line"].(string), "hello from ") || l["instance_id"] == nil || l["region"] == nil {
			t.Fatalf("log line %v", l)
		}
	}

	// Drain moves every instance off a node (to its region peer), then
	// enable makes it eligible again.
	drained := e.agents[2]
	var node map[string]any
	if code := e.call(tok, "POST", "/api/v1/nodes/"+drained.ID+"/drain", nil, &node); code != 200 || node["state"] != "draining" {
		t.Fatalf("drain: %d %v", code, node)
	}
	e.eventually("drained node empty and its region whole", func() bool {
		d := e.waitDeployment(tok, v1.ID.String(), "active")
		return drained.Count() == 0 && d.Regions[drained.Region].Healthy == 3
	})
	if code := e.call(tok, "POST", "/api/v1/nodes/"+drained.ID+"/enable", nil, &node); code != 200 || node["state"] != "ready" {
		t.Fatalf("enable: %d %v", code, node)
	}
	if code := e.call(tok, "POST", "/api/v1/nodes/"+uuid.NewString()+"/drain", nil, nil); code != 404 {
		t.Fatalf("drain of an unknown node: %d", code)
	}

	// An agent that loses an instance gets it created again; an instance
	// nobody asked for is deleted.
	lossy := e.agents[4]
	var lostID string
	for _, in := range e.waitDeployment(tok, v1.ID.String(), "active").Instances {
		if in.NodeID.String() == lossy.ID && in.Desired == "running" {
			lostID = in.ID.String()
		}
	}
	if lostID == "" {
		t.Fatal("no v1 instance on the lossy node")
	}
	lossy.Forget(lostID)
	orphan := uuid.NewString()
	e.agents[5].Adopt(orphan)
	e.eventually("lost instance recreated and orphan deleted", func() bool {
		return lossy.Has(lostID) && lossy.CreatesOf(lostID) >= 2 && !e.agents[5].Has(orphan)
	})

	// A node that stops heartbeating is marked down; its instances are
	// replaced in the same region. When it comes back its old VMs go.
	victim := e.agents[0]
	before := victim.IDs()
	if len(before) == 0 {
		t.Fatal("victim has no instances")
	}
	victim.SetAlive(false)
	deadline := time.Now().Add(30 * time.Second)
	for {
		d := e.waitDeployment(tok, v1.ID.String(), "active")
		if ri := d.Regions[victim.Region]; ri.Healthy == 3 && ri.Desired == 3 {
			moved := true
			for _, in := range d.Instances {
				if in.NodeID.String() == victim.ID && in.Desired == "running" {
					moved = false
				}
			}
			if moved {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("instances of the lost node not replaced: %+v", d.Regions)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Back, its replaced VMs go; the region's instances, crowded on the
	// one node that stayed, spread onto it again, one move at a time.
	victim.SetAlive(true)
	e.eventually("returning node's replaced VMs deleted", func() bool {
		return !slices.ContainsFunc(before, victim.Has)
	})
	e.eventually("instances spread onto the returning node", func() bool {
		d := e.waitDeployment(tok, v1.ID.String(), "active")
		per := map[string]int{}
		for _, in := range d.Instances {
			if in.Region == victim.Region && in.Desired == "running" {
				per[in.NodeID.String()]++
			}
		}
		total := 0
		for _, c := range per {
			total += c
		}
		return len(per) == 2 && per[victim.ID] >= 1 && total == 3 && d.Regions[victim.Region].Healthy == 3
	})

	// Custom domain: routes only once verified, to the active deployment.
	var dom Domain
	if code := e.call(tok, "POST", "/api/v1/projects/web/domains", map[string]any{"name": "WWW.Example.com."}, &dom); code != 201 || dom.Name != "www.example.com" || len(dom.DNSRecords) < 2 {
		t.Fatalf("add domain: %d %+v", code, dom)
	}
	if code := e.call(tok, "POST", "/api/v1/projects/web/domains", map[string]any{"name": "www.example.com"}, nil); code != 409 {
		t.Fatalf("duplicate domain: %d", code)
	}
	if code := e.call(tok, "POST", "/api/v1/projects/web/domains", map[string]any{"name": "x.zeitwork.test"}, nil); code != 400 {
		t.Fatalf("domain under the apps domain: %d", code)
	}
	if code := e.call(tok, "POST", "/api/v1/domains/"+dom.ID.String()+"/verify", nil, &dom); code != 422 || dom.Verified || dom.LastError == "" {
		t.Fatalf("verify without DNS: %d %+v", code, dom)
	}
	if e.routeFor("www.example.com") != nil {
		t.Fatal("unverified domain routed")
	}
	txt := dom.DNSRecords[len(dom.DNSRecords)-1]
	e.dns.SetTXT(txt.Name, txt.Value)
	if code := e.call(tok, "POST", "/api/v1/domains/"+dom.ID.String()+"/verify", nil, &dom); code != 200 || !dom.Verified {
		t.Fatalf("verify with TXT: %d %+v", code, dom)
	}
	if r := e.routeFor("www.example.com"); r == nil || r.Kind != "custom" || r.DeploymentID != v1.ID {
		t.Fatalf("custom route: %+v", r)
	}
	if code := e.call(tok, "DELETE", "/api/v1/domains/"+dom.ID.String(), nil, nil); code != 204 || e.routeFor("www.example.com") != nil {
		t.Fatalf("remove domain: %d", code)
	}

	// Webhooks: a bad signature writes nothing; one push delivered 3 times
	// concurrently creates one deployment.
	payload, err := os.ReadFile("testdata/push.json")
	if err != nil {
		t.Fatal(err)
	}
	payload = bytes.ReplaceAll(payload, []byte("REPO"), []byte("acme/web"))
	sha := "abc1234abc1234abc1234abc1234abc1234abc12"
	payload = bytes.ReplaceAll(payload, []byte("AFTER"), []byte(sha))
	// The project's template resolves {sha} to this tag.
	l, _ := ib.Layer(ib.Entry{Name: "version", Data: []byte(sha)})
	img, _ := ib.Image(ib.Config{Cmd: []string{"/app"}}, l)
	if _, err := ib.Push(t.Context(), e.reg+"/acme/web:"+sha, img); err != nil {
		t.Fatal(err)
	}
	if code := e.call("", "POST", "/api/v1/github/webhook", string(payload), nil, "X-GitHub-Event", "push", "X-GitHub-Delivery", "d-bad", "X-Hub-Signature-256", "sha256=00"); code != 401 {
		t.Fatalf("bad signature: %d", code)
	}
	var n int
	_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT count(*) FROM webhook_deliveries").Scan(&n)
	if n != 0 {
		t.Fatal("a delivery with a bad signature was recorded")
	}
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			start := time.Now()
			code := e.call("", "POST", "/api/v1/github/webhook", string(payload), nil, "X-GitHub-Event", "push", "X-GitHub-Delivery", "d-1", "X-Hub-Signature-256", sign(payload))
			if code/100 != 2 || time.Since(start) > time.Second {
				t.Errorf("webhook: %d in %s", code, time.Since(start))
			}
		})
	}
	wg.Wait()
	if code := e.call("", "POST", "/api/v1/github/webhook", string(payload), nil, "X-GitHub-Event", "push", "X-GitHub-Delivery", "d-2", "X-Hub-Signature-256", sign(payload)); code/100 != 2 {
		t.Fatalf("redelivery under a new id: %d", code)
	}
	_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT count(*) FROM deployments WHERE commit_sha = $1", sha).Scan(&n)
	if n != 1 {
		t.Fatalf("%d deployments for one pushed SHA", n)
	}
	var pushed Deployment
	var id uuid.UUID
	_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT id FROM deployments WHERE commit_sha = $1", sha).Scan(&id)
	pushed = e.waitDeployment(tok, id.String(), "active")
	if r := e.routeFor(alias); r.DeploymentID != pushed.ID {
		t.Fatal("pushed deployment not live")
	}

	// Pushes to another branch are previews: healthy on their own URL,
	// never promoted; a newer preview of the branch supersedes the older.
	var previews []Deployment
	for i, psha := range []string{"feed0001feed0001feed0001feed0001feed0001", "feed0002feed0002feed0002feed0002feed0002"} {
		l, _ := ib.Layer(ib.Entry{Name: "version", Data: []byte(psha)})
		img, _ := ib.Image(ib.Config{Cmd: []string{"/app"}}, l)
		if _, err := ib.Push(t.Context(), e.reg+"/acme/web:"+psha, img); err != nil {
			t.Fatal(err)
		}
		body := bytes.ReplaceAll(payload, []byte(sha), []byte(psha))
		body = bytes.ReplaceAll(body, []byte(`"refs/heads/main"`), []byte(`"refs/heads/feature-x"`))
		var res struct {
			Deployments []string `json:"deployments"`
		}
		if code := e.call("", "POST", "/api/v1/github/webhook", string(body), &res, "X-GitHub-Event", "push", "X-GitHub-Delivery", fmt.Sprintf("p-%d", i), "X-Hub-Signature-256", sign(body)); code != 202 || len(res.Deployments) != 1 {
			t.Fatalf("preview push: %d %+v", code, res)
		}
		d := e.waitDeployment(tok, res.Deployments[0], "healthy", "failed")
		if d.Status != "healthy" || !d.Preview || d.Active || d.Branch != "feature-x" {
			t.Fatalf("preview: %+v", d)
		}
		if r := e.routeFor(d.Hostname); r == nil || len(r.Instances) != 9 {
			t.Fatalf("preview route: %+v", r)
		}
		previews = append(previews, d)
	}
	if r := e.routeFor(alias); r.DeploymentID != pushed.ID {
		t.Fatal("a preview took the production alias")
	}
	e.waitDeployment(tok, previews[0].ID.String(), "superseded")
	// A branch deletion is ignored.
	del := bytes.ReplaceAll(payload, []byte(sha), []byte("0000000000000000000000000000000000000000"))
	del = bytes.ReplaceAll(del, []byte(`"deleted": false`), []byte(`"deleted": true`))
	var ignored map[string]any
	if code := e.call("", "POST", "/api/v1/github/webhook", string(del), &ignored, "X-GitHub-Event", "push", "X-GitHub-Delivery", "del-1", "X-Hub-Signature-256", sign(del)); code != 202 || ignored["ignored"] == nil {
		t.Fatalf("branch deletion: %d %v", code, ignored)
	}
	var ping map[string]any
	if code := e.call("", "POST", "/api/v1/github/webhook", `{"zen":"Design for failure."}`, &ping, "X-GitHub-Event", "ping", "X-GitHub-Delivery", "ping-1", "X-Hub-Signature-256", sign([]byte(`{"zen":"Design for failure."}`))); code != 200 || ping["message"] != "pong" {
		t.Fatalf("ping: %d %v", code, ping)
	}
	// Never two instance rows for one slot: per deployment and region
	// exactly min running instances.
	var dupes int
	_ = e.ops[0].pool.QueryRow(t.Context(), `SELECT count(*) FROM (SELECT deployment_id, region_id FROM instances
		WHERE deleted_at IS NULL AND desired_state = 'running' GROUP BY 1, 2 HAVING count(*) > 3) x`).Scan(&dupes)
	if dupes != 0 {
		t.Fatalf("%d deployment/region pairs have more than 3 instances", dupes)
	}
}

func pgtestPool(t testing.TB, url string) *pgxpoolPool {
	t.Helper()
	p, err := openPool(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// TestRollbackRestartsStoppedDeployment rolls back to a deployment whose
// VMs were stopped after the retention window: they start again first and
// the alias moves only once they are healthy.
func TestRollbackRestartsStoppedDeployment(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.Retention = 500 * time.Millisecond })
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	if code := e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "min_instances_per_region": 2}, nil); code != 201 {
		t.Fatalf("create project: %d", code)
	}
	deploy := func(image string) Deployment {
		var d Deployment
		if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": image}, &d); code != 202 {
			t.Fatalf("deploy: %d", code)
		}
		return e.waitDeployment(tok, d.ID.String(), "active")
	}
	v1 := deploy(e.images["v1"])
	v2 := deploy(e.images["v2"])
	e.eventually("v1 stopped after the retention window", func() bool {
		d := e.waitDeployment(tok, v1.ID.String(), "superseded")
		for _, ri := range d.Regions {
			if ri.Desired > 0 {
				return false
			}
		}
		for _, in := range v1.Instances {
			if e.agentOf(in.NodeID).Has(in.ID.String()) {
				return false
			}
		}
		return true
	})
	if r := e.routeFor(v1.Hostname); r != nil && len(r.Instances) != 0 {
		t.Fatalf("stopped v1 still has backends: %+v", r)
	}
	var rb Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/rollback", nil, &rb); code != 200 || rb.ID != v1.ID {
		t.Fatalf("rollback: %d %s", code, rb.ID)
	}
	alias := "web-acme.zeitwork.test"
	for {
		r := e.routeFor(alias) // route first, then status (see above)
		d := e.waitDeployment(tok, v1.ID.String(), "starting", "healthy", "active")
		if d.Status != "active" {
			if r.DeploymentID != v2.ID {
				t.Fatalf("alias moved to v1 while it is %s", d.Status)
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if r = e.routeFor(alias); r.DeploymentID != v1.ID || len(r.Instances) != 6 {
			t.Fatalf("alias after rollback: %+v", r)
		}
		break
	}
	if d := e.waitDeployment(tok, v2.ID.String(), "superseded"); d.Active {
		t.Fatal("v2 still active")
	}

	// Scaling the project changes the running deployment in every region.
	for _, n := range []int{1, 3} {
		if code := e.call(tok, "PATCH", "/api/v1/projects/web", map[string]any{"min_instances_per_region": n}, nil); code != 200 {
			t.Fatalf("scale to %d: %d", n, code)
		}
		e.eventually(fmt.Sprintf("%d healthy instances per region", n), func() bool {
			d := e.waitDeployment(tok, v1.ID.String(), "active")
			for _, ri := range d.Regions {
				if ri.Desired != n || ri.Healthy != n {
					return false
				}
			}
			r := e.routeFor(alias)
			return len(d.Regions) == 3 && len(r.Instances) == 3*n
		})
	}
}

// TestLeaderFailover: the leader's background work stops; the second
// operator takes the lock over and finishes the deployment.
func TestLeaderFailover(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	e.eventually("first operator leads", e.ops[0].Leading)
	op2, _, _ := startStoppableOperator(t, e.cfg)
	if code := e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "min_instances_per_region": 1}, nil); code != 201 {
		t.Fatalf("create project: %d", code)
	}
	// Stop the first operator's background work (its API keeps serving the
	// agents' heartbeats, as a second API replica would).
	e.stopFirst()
	if e.ops[0].Leading() {
		t.Fatal("a stopped operator still leads")
	}
	var d Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v1"]}, &d); code != 202 {
		t.Fatalf("deploy: %d", code)
	}
	e.eventually("second operator leads", op2.Leading)
	if d = e.waitDeployment(tok, d.ID.String(), "active", "failed"); d.Status != "active" || len(d.Instances) != 3 {
		t.Fatalf("after failover: %s %q", d.Status, d.FailureReason)
	}
}

// TestLeaderLockSessionEnded: the server ends the leader's lock session (as
// it does when its keepalives find the leader's host gone); the leader
// steps down and one operator leads again on a new session, three times in
// a row.
func TestLeaderLockSessionEnded(t *testing.T) {
	t.Parallel()
	cfg := testConfig(pgtest.URL(t))
	ops := make([]*Operator, 2)
	for i := range ops {
		ops[i], _ = startOperator(t, cfg)
	}
	admin := pgtestPool(t, cfg.DatabaseURL)
	// holder is the pid of the session holding the leader lock (0: none)
	// once exactly one operator says it leads.
	holder := func() int32 {
		n := 0
		for _, op := range ops {
			if op.Leading() {
				n++
			}
		}
		var pid int32
		_ = admin.QueryRow(t.Context(), `SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
			AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
			AND ((classid::bigint << 32) | objid::bigint) = $1`, int64(leaderLockKey)).Scan(&pid)
		if n != 1 {
			return 0
		}
		return pid
	}
	var last int32
	for round := range 3 {
		var pid int32
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if pid = holder(); pid != 0 && pid != last {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: no single leader on a new session 30 s after the last one ended", round)
			}
		}
		if _, err := admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", pid); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		last = pid
	}
}

// TestHeartbeatsOfARegionDoNotQueue: a node's heartbeat does not wait for
// another heartbeat of its region still in its transaction (one from a
// region far from the database holds it for several round trips).
func TestHeartbeatsOfARegionDoNotQueue(t *testing.T) {
	t.Parallel()
	cfg := testConfig(pgtest.URL(t))
	_, url := startOperator(t, cfg)
	beat := func(id uuid.UUID) error {
		b, _ := json.Marshal(map[string]any{"id": id, "hostname": "h", "region": "far-away", "address": "http://192.0.2.1:8081", "vcpus": 4, "memory_mib": 4096})
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "POST", url+"/api/v1/internal/nodes/"+id.String()+"/heartbeat", bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+clusterToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	if err := beat(newID()); err != nil { // the region exists from here on
		t.Fatal(err)
	}
	// A heartbeat in flight: its transaction has resolved the region and
	// written its node, and has not committed yet.
	admin := pgtestPool(t, cfg.DatabaseURL)
	tx, err := admin.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	region, err := regionID(t.Context(), tx, "far-away")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(t.Context(), Q("NodeUpsert"), newID(), region, "h2", "http://192.0.2.2:8081", 4, 4096, 0, 0); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := beat(newID()); err != nil {
		t.Fatalf("a heartbeat of the same region waited for the open one: %v", err)
	}
	t.Logf("heartbeat beside an open one of its region: %s", time.Since(start).Round(time.Millisecond))
}

// TestSilentNodeDoesNotStallStops: one node takes requests and never
// answers (its packets dropped, not refused); the leader still stops the
// instances of every other node at once instead of after that node's
// timeouts.
func TestSilentNodeDoesNotStallStops(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	d := e.deployOnePerRegion(tok)
	// v2 supersedes v1, whose instances then stop (as at the end of the
	// retention window) while nothing else is to be done.
	var d2 Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v2"]}, &d2); code != 202 {
		t.Fatalf("deploy v2: %d", code)
	}
	if d2 = e.waitDeployment(tok, d2.ID.String(), "active", "failed"); d2.Status != "active" {
		t.Fatalf("deploy v2: %s %q", d2.Status, d2.FailureReason)
	}
	silent := e.agentOf(d.Instances[0].NodeID)
	silent.SetSilent(true)
	admin := pgtestPool(t, e.cfg.DatabaseURL)
	if _, err := admin.Exec(t.Context(), "UPDATE instances SET desired_state = 'stopped' WHERE deployment_id = $1", d.ID); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for _, in := range d.Instances[1:] {
		a := e.agentOf(in.NodeID)
		for slices.Contains(a.IDs(), in.ID.String()) {
			if time.Since(start) > 5*time.Second {
				t.Fatalf("instance %s of a node that answers still runs %s after it was to stop", in.ID, time.Since(start).Round(time.Millisecond))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	t.Logf("the answering nodes' instances stopped after %s", time.Since(start).Round(time.Millisecond))
	silent.SetSilent(false)
	for slices.Contains(silent.IDs(), d.Instances[0].ID.String()) {
		if time.Since(start) > 40*time.Second {
			t.Fatal("the silent node's instance still runs 40 s after the node answers again")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestClosedDeploymentsRunNothing: a reconcile pass that read a deployment
// before it was stopped cannot give it a new instance afterwards, and an
// instance of a stopped deployment still running (whatever left it) is
// stopped on its node by the next pass.
func TestClosedDeploymentsRunNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	d := e.deployOnePerRegion(tok)
	admin := pgtestPool(t, e.cfg.DatabaseURL)
	// The deployment stops, but its instances are left to run: the state
	// a placement racing the stop would leave behind.
	if _, err := admin.Exec(t.Context(), "UPDATE deployments SET status = 'stopped' WHERE id = $1", d.ID); err != nil {
		t.Fatal(err)
	}
	in := d.Instances[0]
	var regionID uuid.UUID
	if err := admin.QueryRow(t.Context(), "SELECT region_id FROM instances WHERE id = $1", in.ID).Scan(&regionID); err != nil {
		t.Fatal(err)
	}
	tag, err := admin.Exec(t.Context(), Q("InstanceInsert"), uuid.Must(uuid.NewV7()), d.ID, in.NodeID, regionID, 1, 128)
	if err != nil || tag.RowsAffected() != 0 {
		t.Fatalf("instance inserted for a stopped deployment: %v %v", tag, err)
	}
	e.eventually("the stopped deployment's VMs stopped", func() bool {
		for _, in := range d.Instances {
			if e.agentOf(in.NodeID).Has(in.ID.String()) {
				return false
			}
		}
		return true
	})
	var live int
	if err := admin.QueryRow(t.Context(), "SELECT count(*) FROM instances WHERE deployment_id = $1 AND deleted_at IS NULL", d.ID).Scan(&live); err != nil || live != 0 {
		t.Fatalf("%d instance rows of the stopped deployment remain (%v)", live, err)
	}
}

// TestSilentNodeGetsNoNewInstances: a node whose heartbeats stopped, not
// yet marked down (NODE_DOWN_AFTER), gets no new instance once half of
// that has passed: a placement there would wait on a node that does not
// answer. Once it reports again, the deployment spreads onto it.
func TestSilentNodeGetsNoNewInstances(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.NodeDownAfter = 8 * time.Second })
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	d := e.deployOnePerRegion(tok)
	busy := e.agentOf(d.Instances[0].NodeID)
	var silent *agenttest.Agent
	for _, a := range e.agents {
		if a.Region == busy.Region && a != busy {
			silent = a
		}
	}
	silent.SetAlive(false) // no more heartbeats
	time.Sleep(4*time.Second + 500*time.Millisecond)
	if code := e.call(tok, "PATCH", "/api/v1/projects/web", map[string]any{"min_instances_per_region": 2}, nil); code != 200 {
		t.Fatalf("scale: %d", code)
	}
	admin := pgtestPool(t, e.cfg.DatabaseURL)
	placed := func(node string) int {
		var n int
		if err := admin.QueryRow(t.Context(), `SELECT count(*) FROM instances WHERE deployment_id = $1 AND node_id = $2
			AND deleted_at IS NULL AND desired_state = 'running'`, d.ID, node).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	e.eventually("a second instance in the region", func() bool { return placed(busy.ID)+placed(silent.ID) == 2 })
	if n := placed(silent.ID); n != 0 {
		t.Fatalf("%d instance(s) placed on a node silent for 4.5 s (down after 8 s)", n)
	}
	silent.SetAlive(true)
	e.eventually("the deployment spread onto the node that reports again", func() bool {
		return placed(silent.ID) == 1 && placed(busy.ID) == 1 && silent.Count() == 1
	})
}
