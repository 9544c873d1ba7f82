package nodeagent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/dataplane"
	"github.com/zeitwork/zeitwork/internal/ocitest"
)

const token = "test-cluster-token"

// operator is a stand-in for the operator's internal API: it records the
// node agent's registrations and heartbeats.
type operator struct {
	mu         sync.Mutex
	registered []map[string]any
	beats      []map[string]any
}

func (o *operator) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+token {
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	var body map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	switch {
	case r.URL.Path == "/api/v1/internal/nodes/register":
		o.registered = append(o.registered, body)
	case strings.HasSuffix(r.URL.Path, "/heartbeat"):
		o.beats = append(o.beats, body)
	default:
		http.NotFound(w, r)
		return
	}
	_, _ = w.Write([]byte(`{"ok":true}`))
}

type fixture struct {
	t       *testing.T
	cfg     Config
	appRef  string // the test app image (by tag)
	crash   string // the same image exiting with code 3 at start
	op      *operator
	reg     *prometheus.Registry
	agent   *Agent
	api     *httptest.Server // the agent, on its Unix socket
	srv     *httptest.Server // the data plane, on the node's port
	cancel  context.CancelFunc
	stopped chan struct{}
}

func newFixture(t *testing.T) *fixture {
	if os.Getuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the node agent test needs root on CI (taps, nftables)")
		}
		t.Skip("needs root (taps, nftables, QEMU)")
	}
	dir := t.TempDir()
	initBin := filepath.Join(dir, "zeitwork-init")
	cmd := exec.Command("go", "build", "-o", initBin, "github.com/zeitwork/zeitwork/cmd/zeitwork-init")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build zeitwork-init: %v\n%s", err, out)
	}
	bin := ocitest.GoBinary(t, ocitest.TestAppPackage)
	reg := ocitest.Registry(t)
	f := &fixture{t: t, op: &operator{}}
	ocitest.PushApp(t.Context(), t, reg, "test/app:v1", bin, "SHADOWED=image")
	f.appRef = reg + "/test/app:v1"
	ocitest.PushApp(t.Context(), t, reg, "test/crash:v1", bin, "EXIT_AT_START=3")
	f.crash = reg + "/test/crash:v1"
	ops := httptest.NewServer(f.op)
	t.Cleanup(ops.Close)
	opURL, _ := url.Parse(ops.URL)
	f.cfg = Config{
		Addr: "127.0.0.1:0", NodeID: "", Region: "test", WorkDir: filepath.Join(dir, "work"), Token: token,
		Operators: []*url.URL{opURL}, Advertise: "http://127.0.0.1:8081",
		Subnet: netip.MustParsePrefix("10.231.0.0/24"), KernelDir: "/var/cache/zeitwork-test/kernel", InitBin: initBin,
		VMM: "qemu", CacheBytes: 1 << 30, HealthInterval: 250 * time.Millisecond, Heartbeat: 200 * time.Millisecond,
		StopGrace: 3 * time.Second, MaxRestarts: 3, MaxBackoff: 2 * time.Second, VCPUs: 4, MemoryMiB: 640,
		BootConcurrency: 2, BootTimeout: 60 * time.Second, DNS: []string{"192.0.2.53"},
	}
	f.startDataPlane()
	f.start()
	t.Cleanup(func() {
		f.stop()
		// Nothing of the test may outlive it: VMs, taps, the nftables table.
		a, err := New(context.Background(), f.cfg, nil, slog.New(slog.DiscardHandler))
		if err != nil {
			return
		}
		for _, st := range a.List() {
			_ = a.Delete(context.Background(), st.ID)
		}
		a.detach()
		_ = a.net.Teardown()
	})
	return f
}

// startDataPlane runs the node's data plane (in process; ADR 0354) for
// the whole test: it outlives agent restarts. It listens on all
// addresses, so that the isolation check below means something: without
// the rules a VM could reach it, and through it the API, via its gateway.
func (f *fixture) startDataPlane() {
	t := f.t
	p := dataplane.PathsFor(f.cfg.WorkDir)
	dp := dataplane.New(dataplane.Config{Token: token, TablePath: p.Table, AgentSocket: p.AgentSocket, Poll: 10 * time.Millisecond},
		slog.New(slog.DiscardHandler))
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	f.srv = httptest.NewUnstartedServer(dp.Handler())
	f.srv.Listener.Close()
	f.srv.Listener = ln
	f.srv.Start()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = dp.Run(ctx); close(done) }()
	t.Cleanup(func() { f.srv.Close(); cancel(); <-done })
}

// start runs an agent on the fixture's work directory, as a restarted
// process would, serving its API on its Unix socket.
func (f *fixture) start() {
	t := f.t
	ctx, cancel := context.WithCancel(context.Background())
	f.reg = prometheus.NewRegistry()
	a, err := New(ctx, f.cfg, f.reg, slog.New(slog.DiscardHandler))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	sock := dataplane.PathsFor(f.cfg.WorkDir).AgentSocket
	_ = os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	f.agent, f.cancel, f.stopped = a, cancel, make(chan struct{})
	f.api = httptest.NewUnstartedServer(a.Handler(http.NotFoundHandler()))
	f.api.Listener.Close()
	f.api.Listener = ln
	f.api.Start()
	go func() { _ = a.Run(ctx); close(f.stopped) }()
}

// stop ends the agent without touching its VMs (an agent restart).
func (f *fixture) stop() {
	if f.cancel == nil {
		return
	}
	f.api.Close()
	f.cancel()
	<-f.stopped
	f.cancel = nil
}

func (f *fixture) url(path string) string {
	port := f.srv.Listener.Addr().(*net.TCPAddr).Port
	return fmt.Sprintf("http://127.0.0.1:%d%s", port, path)
}

func (f *fixture) do(method, path string, body any, out any) int {
	f.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, f.url(path), rd)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	if out != nil {
		_ = json.NewDecoder(resp.Body).Decode(out)
	}
	return resp.StatusCode
}

// app sends a data-plane request to instance id. The data plane follows
// the agent's table within its poll interval, so a 503 right after the
// API said running is retried briefly.
func (f *fixture) app(id, path string) (int, string) {
	f.t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		req, _ := http.NewRequest("GET", f.url(path), nil)
		req.Host = "web-abc1234-acme.zeitwork.test"
		req.Header.Set("X-Zeitwork-Instance", id)
		req.Header.Set("X-Zeitwork-Token", token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			f.t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 503 || time.Now().After(deadline) {
			return resp.StatusCode, string(b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (f *fixture) status(id string) Status {
	f.t.Helper()
	var st Status
	f.do("GET", "/instances/"+id, nil, &st)
	return st
}

// waitFor polls instance id until cond holds (bounded: 3 minutes).
func (f *fixture) waitFor(id, what string, cond func(Status) bool) Status {
	f.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		st := f.status(id)
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			console, _ := os.ReadFile(filepath.Join(f.cfg.WorkDir, "instances", id, "console.log"))
			rules, _ := exec.Command("nft", "list", "table", "inet", f.agent.net.Table()).CombinedOutput()
			f.t.Logf("rules:\n%s", rules)
			f.t.Fatalf("instance %s never %s: %+v\nconsole:\n%s", id, what, st, console)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (f *fixture) waitHealthy(id string) Status {
	f.t.Helper()
	return f.waitFor(id, "healthy", func(s Status) bool { return s.Healthy && s.State == StateRunning })
}

func pidOf(t *testing.T, dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, "vmm.pid"))
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	fmt.Sscan(string(b), &pid)
	return pid
}

func alive(pid int) bool { return pid > 0 && syscall.Kill(pid, 0) == nil }

// TestNodeAgent runs the whole runtime against real microVMs: an OCI image
// from a loopback registry is converted, booted and served through the
// data plane; the image's env, workdir, non-root user and every layer rule
// are checked inside the VM; streaming and upgraded connections pass
// through; VMs reach neither each other nor the agent; the operator gets a
// registration and heartbeats; an agent restart re-adopts three running
// VMs; a crash loop backs off and fails; stop and delete leave nothing.
func TestNodeAgent(t *testing.T) {
	f := newFixture(t)

	// API validation and idempotency.
	var st Status
	if code := f.do("POST", "/instances", Spec{ID: "i1", DeploymentID: "d1", Image: f.appRef, Port: 8080, HealthPath: "/healthz",
		Env: map[string]string{"PROJECT_SECRET": "s3cret", "SHADOWED": "project"}}, &st); code != 201 || st.State == "" {
		t.Fatalf("create: %d %+v", code, st)
	}
	if st := f.status("i1"); st.Env != nil {
		t.Fatalf("the API shows the project environment: %v", st.Env)
	}
	if fi, err := os.Stat(filepath.Join(f.cfg.WorkDir, "instances", "i1", "status.json")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file holding secrets: %v %v", fi, err)
	}
	if code := f.do("POST", "/instances", Spec{ID: "i1", Image: f.appRef}, nil); code != 200 {
		t.Fatalf("create again = %d, want 200 (idempotent)", code)
	}
	for _, bad := range []map[string]any{
		{"id": "../x", "image": f.appRef}, {"id": "x", "image": f.appRef, "bogus": 1}, {"id": "x"},
		{"id": "x", "image": f.appRef, "port": 70000}, {"id": "x", "image": f.appRef, "memory_mib": 32},
	} {
		if code := f.do("POST", "/instances", bad, nil); code != 400 {
			t.Fatalf("create %v = %d, want 400", bad, code)
		}
	}
	if code := f.do("POST", "/instances", Spec{ID: "huge", Image: f.appRef, MemoryMiB: 4096}, nil); code != 409 {
		t.Fatalf("over capacity = %d, want 409", code)
	}
	if resp, err := http.Get(f.url("/instances")); err != nil || resp.StatusCode != 401 {
		t.Fatalf("no token: %v %v", resp, err)
	}
	if code, _ := f.app("nope", "/"); code != 404 {
		t.Fatalf("data plane to an unknown instance = %d", code)
	}
	f.do("POST", "/instances", Spec{ID: "i2", Image: f.appRef, Port: 8080, HealthPath: "/healthz"}, nil)
	f.do("POST", "/instances", Spec{ID: "i3", Image: f.appRef, Port: 8080, HealthPath: "/healthz"}, nil)
	s1, s2 := f.waitHealthy("i1"), f.waitHealthy("i2")
	f.waitHealthy("i3")

	// Inside the VM: identity, environment, working directory, layers.
	q := url.Values{"path": ocitest.Paths()}
	code, body := f.app("i1", "/report?"+q.Encode())
	if code != 200 {
		t.Fatalf("report: %d %s", code, body)
	}
	var rep struct {
		UID, GID   int
		Groups     []int
		Workdir    string
		Env        []string
		Files      map[string]map[string]any
		HostHeader string `json:"host_header"`
		Headers    http.Header
	}
	if err := json.Unmarshal([]byte(body), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.UID != ocitest.AppUID || rep.GID != ocitest.AppGID || !slices.Contains(rep.Groups, ocitest.AppExtraGID) || rep.Workdir != ocitest.AppWorkDir {
		t.Errorf("app runs as uid %d gid %d groups %v in %q", rep.UID, rep.GID, rep.Groups, rep.Workdir)
	}
	for _, want := range []string{ocitest.AppEnv, "PROJECT_SECRET=s3cret", "SHADOWED=project", "PORT=8080", "HOME=" + ocitest.AppHome} {
		if !slices.Contains(rep.Env, want) {
			t.Errorf("env lacks %s: %v", want, rep.Env)
		}
	}
	if slices.Contains(rep.Env, "SHADOWED=image") {
		t.Errorf("project env did not override the image's: %v", rep.Env)
	}
	ocitest.Check(t, rep.Files)
	if rep.HostHeader != "web-abc1234-acme.zeitwork.test" || rep.Headers.Get("X-Zeitwork-Token") != "" || rep.Headers.Get("X-Zeitwork-Instance") != "" {
		t.Errorf("proxied request: host %q headers %v", rep.HostHeader, rep.Headers)
	}
	if code, body := f.app("i2", "/"); code != 200 || !strings.HasPrefix(body, "hello from") {
		t.Fatalf("data plane i2: %d %q", code, body)
	}
	checkStreaming(t, f, "i1")

	// Isolation: a VM reaches itself, but neither another VM nor the agent.
	agentPort := f.srv.Listener.Addr().(*net.TCPAddr).Port
	if _, body := f.app("i1", "/dial?addr="+net.JoinHostPort(s1.IP, "8080")); !strings.HasPrefix(body, "connected") {
		t.Fatalf("control: the VM cannot reach its own port: %s", body)
	}
	for _, target := range []string{net.JoinHostPort(s2.IP, "8080"), net.JoinHostPort(gateway(s1.IP), fmt.Sprint(agentPort)),
		net.JoinHostPort(gateway(s2.IP), fmt.Sprint(agentPort))} {
		if _, body := f.app("i1", "/dial?addr="+target); !strings.HasPrefix(body, "blocked") {
			t.Fatalf("VM i1 reached %s: %s", target, body)
		}
	}

	// Logs: both streams, NDJSON.
	lines := f.logs("i1", false)
	if !hasLine(lines, "stdout", "testapp listening on :8080") || !hasLine(lines, "stderr", "testapp stderr line") {
		t.Fatalf("logs: %+v", lines)
	}

	// Node documents and the operator's view.
	var res Resources
	f.do("GET", "/node/resources", nil, &res)
	if res.AllocatedVCPUs != 3 || res.AllocatedMemoryMiB != 3*128 || res.FreeMemoryMiB != 640-3*128 || res.HostCPUs < 1 ||
		res.HostMemoryMiB < 1 || res.DiskBytes == 0 || res.ImageCacheImages < 1 {
		t.Fatalf("resources: %+v", res)
	}
	var info map[string]any
	f.do("GET", "/node/info", nil, &info)
	if info["id"] != f.agent.NodeID() || info["vmm"] != "qemu" || info["accelerator"] == "" || info["region"] != "test" {
		t.Fatalf("info: %v", info)
	}
	waitOperator(t, f)
	if n := metric(t, f.reg, "zeitwork_node_agent_boot_seconds"); n != 3 {
		t.Fatalf("boot time observed %v times, want 3", n)
	}

	// Agent restart: the three VMs keep running and are re-adopted.
	pids := map[string]int{}
	for _, id := range []string{"i1", "i2", "i3"} {
		pids[id] = pidOf(t, filepath.Join(f.cfg.WorkDir, "instances", id))
	}
	nodeID := f.agent.NodeID()
	f.stop()
	for id, pid := range pids {
		if !alive(pid) {
			t.Fatalf("VM %s (pid %d) died with the agent", id, pid)
		}
	}
	// While the agent is down the data plane keeps serving its VMs; only
	// the API is unavailable.
	for id := range pids {
		if code, body := f.app(id, "/"); code != 200 || !strings.HasPrefix(body, "hello from") {
			t.Fatalf("with the agent down, %s: %d %q", id, code, body)
		}
	}
	if code := f.do("GET", "/instances", nil, nil); code != 503 {
		t.Fatalf("API with the agent down: %d, want 503", code)
	}
	f.start()
	if f.agent.NodeID() != nodeID {
		t.Fatalf("node id changed across restarts: %s → %s", nodeID, f.agent.NodeID())
	}
	for id, pid := range pids {
		st := f.waitHealthy(id)
		if got := pidOf(t, filepath.Join(f.cfg.WorkDir, "instances", id)); got != pid || st.Restarts != 0 {
			t.Fatalf("instance %s was restarted instead of re-adopted (pid %d → %d, %+v)", id, pid, got, st)
		}
		if code, _ := f.app(id, "/"); code != 200 {
			t.Fatalf("re-adopted %s does not serve: %d", id, code)
		}
	}

	// Stop is graceful: the VM powers off, its tap and disk go, the record stays.
	lease, _ := f.agent.net.Lease("i3")
	follow := f.followLogs("i3")
	if code := f.do("POST", "/instances/i3/stop", nil, nil); code != 202 {
		t.Fatalf("stop: %d", code)
	}
	st = f.waitFor("i3", "stopped", func(s Status) bool { return s.State == StateStopped })
	if st.Healthy || alive(pids["i3"]) || tapExists(lease.Tap) {
		t.Fatalf("stopped instance: %+v alive=%v tap=%v", st, alive(pids["i3"]), tapExists(lease.Tap))
	}
	if _, err := os.Stat(filepath.Join(f.cfg.WorkDir, "instances", "i3", "disk.qcow2")); err == nil {
		t.Fatal("stopped instance kept its disk")
	}
	if got := <-follow; !hasLine(got, "stdout", "testapp listening") {
		t.Fatalf("followed logs: %+v", got)
	}
	// A stopped instance starts again (a new VM).
	if code := f.do("POST", "/instances/i3/start", nil, nil); code != 202 {
		t.Fatalf("start: %d", code)
	}
	if st := f.waitHealthy("i3"); st.IP == "" || st.Desired != DesiredRunning {
		t.Fatalf("restarted i3: %+v (lease %s)", st, lease.GuestIP)
	}
	oldPID := pids["i3"]
	pids["i3"] = pidOf(t, filepath.Join(f.cfg.WorkDir, "instances", "i3"))
	if pids["i3"] == oldPID || !alive(pids["i3"]) {
		t.Fatal("start did not boot a new VM")
	}

	// Crash loop: restarts with backoff, then failed with the exit code.
	f.do("POST", "/instances", Spec{ID: "crash", Image: f.crash, Port: 8080}, nil)
	st = f.waitFor("crash", "failed", func(s Status) bool { return s.State == StateFailed })
	if st.Restarts < 2 || !strings.Contains(st.Error, "crashed") || st.ExitCode == nil || *st.ExitCode != 3 {
		t.Fatalf("crash loop: %+v", st)
	}

	// Delete leaves no process, tap, lease, disk or state behind.
	for _, id := range []string{"i1", "i2", "i3", "crash"} {
		lease, hasLease := f.agent.net.Lease(id)
		if code := f.do("DELETE", "/instances/"+id, nil, nil); code != 204 {
			t.Fatalf("delete %s: %d", id, code)
		}
		if alive(pids[id]) {
			t.Fatalf("VM %s still running after delete", id)
		}
		if hasLease && tapExists(lease.Tap) {
			t.Fatalf("tap %s left behind", lease.Tap)
		}
		if _, err := os.Stat(filepath.Join(f.cfg.WorkDir, "instances", id)); err == nil {
			t.Fatalf("state of %s left behind", id)
		}
		if code := f.do("GET", "/instances/"+id, nil, nil); code != 404 {
			t.Fatalf("deleted %s still listed: %d", id, code)
		}
	}
	if l := f.agent.net.Leases(); len(l) != 0 {
		t.Fatalf("leases left: %+v", l)
	}
	if out, _ := exec.Command("ip", "-o", "link", "show").Output(); strings.Contains(string(out), f.agent.net.TapPrefix()) {
		t.Fatalf("taps left:\n%s", out)
	}
}

// checkStreaming: a response flushed chunk by chunk arrives while the app
// still holds it open, and an upgraded connection carries bytes both ways.
func checkStreaming(t *testing.T, f *fixture, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", f.url("/stream?n=2&hold=1"), nil)
	req.Header.Set("X-Zeitwork-Instance", id)
	req.Header.Set("X-Zeitwork-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	for i := range 2 {
		if line, err := br.ReadString('\n'); err != nil || line != fmt.Sprintf("chunk %d\n", i) {
			t.Fatalf("streamed chunk %d: %q %v (buffered by the proxy?)", i, line, err)
		}
	}
	resp.Body.Close()
	cancel()

	c, err := net.Dial("tcp", f.srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(c, "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: zw-echo\r\nX-Zeitwork-Instance: %s\r\nX-Zeitwork-Token: %s\r\n\r\n", id, token)
	cr := bufio.NewReader(c)
	up, err := http.ReadResponse(cr, nil)
	if err != nil || up.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", up, err)
	}
	for _, msg := range []string{"ping\n", "pong\n"} {
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatal(err)
		}
		if got, err := cr.ReadString('\n'); err != nil || got != msg {
			t.Fatalf("echo over the upgraded connection: %q %v", got, err)
		}
	}
}

func (f *fixture) logs(id string, follow bool) []LogLine {
	f.t.Helper()
	path := "/instances/" + id + "/logs"
	if follow {
		path += "?follow=1"
	}
	req, _ := http.NewRequest("GET", f.url(path), nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Error(err)
		return nil
	}
	defer resp.Body.Close()
	var out []LogLine
	dec := json.NewDecoder(resp.Body)
	for {
		var l LogLine
		if err := dec.Decode(&l); err != nil {
			return out
		}
		out = append(out, l)
	}
}

// followLogs follows id's logs until the stream ends (the instance stops).
func (f *fixture) followLogs(id string) <-chan []LogLine {
	ch := make(chan []LogLine, 1)
	go func() { ch <- f.logs(id, true) }()
	return ch
}

func hasLine(lines []LogLine, stream, prefix string) bool {
	for _, l := range lines {
		if l.Stream == stream && strings.HasPrefix(l.Line, prefix) && !l.Time.IsZero() {
			return true
		}
	}
	return false
}

func waitOperator(t *testing.T, f *fixture) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		f.op.mu.Lock()
		reg, beats := slices.Clone(f.op.registered), slices.Clone(f.op.beats)
		f.op.mu.Unlock()
		if len(reg) > 0 && len(beats) > 0 {
			r, last := reg[0], beats[len(beats)-1]
			if r["id"] != f.agent.NodeID() || r["region"] != "test" || r["vcpus"] != float64(4) || r["memory_mib"] != float64(640) {
				t.Fatalf("registration: %v", r)
			}
			healthy := 0
			for _, in := range last["instances"].([]any) {
				if m := in.(map[string]any); m["healthy"] == true && m["state"] == StateRunning {
					healthy++
				}
			}
			if healthy == 3 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("operator saw %d registrations and %d heartbeats, never 3 healthy instances", len(reg), len(beats))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// metric returns a histogram's sample count.
func metric(t *testing.T, reg *prometheus.Registry, name string) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	return 0
}

func tapExists(name string) bool { return exec.Command("ip", "link", "show", "dev", name).Run() == nil }

// gateway is the host side of a guest's /30.
func gateway(guest string) string {
	a := netip.MustParseAddr(guest).As4()
	a[3]--
	return netip.AddrFrom4(a).String()
}
