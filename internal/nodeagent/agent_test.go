package nodeagent

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	ib "github.com/zeitwork/zeitwork/internal/imagebuild"
)

const token = "test-cluster-token"

func goBuild(t *testing.T, pkg, out string) []byte {
	t.Helper()
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type fixture struct {
	t       *testing.T
	cfg     Config
	ref     string // the test app image
	crash   string // an image that exits at once
	agent   *Agent
	srv     *httptest.Server
	cancel  context.CancelFunc
	stopped chan struct{}
}

func newFixture(t *testing.T) *fixture {
	dir := t.TempDir()
	initBin := filepath.Join(dir, "zeitwork-init")
	goBuild(t, "github.com/zeitwork/zeitwork/cmd/zeitwork-init", initBin)
	hello := goBuild(t, "github.com/zeitwork/zeitwork/examples/hello", filepath.Join(dir, "hello"))

	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(reg.Close)
	host := strings.TrimPrefix(reg.URL, "http://")
	base, err := ib.Layer(
		ib.Entry{Name: "app/", Type: tar.TypeDir},
		ib.Entry{Name: "app/hello", Data: hello, Mode: 0o755},
		ib.Entry{Name: "etc/passwd", Data: []byte("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n")},
		ib.Entry{Name: "etc/group", Data: []byte("root:x:0:\napp:x:1000:\n")},
		ib.Entry{Name: "gone.txt", Data: []byte("removed by a whiteout")},
		ib.Entry{Name: "opaque/old.txt", Data: []byte("hidden by an opaque dir")},
		ib.Entry{Name: "data/original.txt", Data: []byte("shared"), UID: 1000, GID: 1000, Mode: 0o640},
	)
	if err != nil {
		t.Fatal(err)
	}
	upper, err := ib.Layer(
		ib.Entry{Name: ".wh.gone.txt"},
		ib.Entry{Name: "opaque/.wh..wh..opq"},
		ib.Entry{Name: "opaque/new.txt", Data: []byte("kept")},
		ib.Entry{Name: "data/hardlink.txt", Type: tar.TypeLink, Linkname: "data/original.txt"},
		ib.Entry{Name: "data/outside", Type: tar.TypeSymlink, Linkname: "../../../../etc/passwd"},
		ib.Entry{Name: "../../escaped.txt", Data: []byte("contained")},
		ib.Entry{Name: "data/", Type: tar.TypeDir, UID: 1000, GID: 1000},
	)
	if err != nil {
		t.Fatal(err)
	}
	img, err := ib.Image(ib.Config{Entrypoint: []string{"/app/hello"}, Env: []string{"FOO=from-image", "PATH=/bin"}, WorkingDir: "/data", User: "app", Port: 8080}, base, upper)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t}
	if f.ref, err = ib.Push(t.Context(), host+"/test/app:v1", img); err != nil {
		t.Fatal(err)
	}
	crashImg, err := ib.Image(ib.Config{Entrypoint: []string{"/app/hello"}, Env: []string{"EXIT_AT_START=1"}}, base)
	if err != nil {
		t.Fatal(err)
	}
	if f.crash, err = ib.Push(t.Context(), host+"/test/crash:v1", crashImg); err != nil {
		t.Fatal(err)
	}
	f.cfg = Config{
		Addr: "127.0.0.1:0", NodeID: "node-test", Region: "test", WorkDir: filepath.Join(dir, "work"), Token: token,
		Subnet: netip.MustParsePrefix("10.231.0.0/24"), KernelDir: "/var/cache/zeitwork-test/kernel", InitBin: initBin,
		VMM: "qemu", CacheBytes: 1 << 30, HealthInterval: 250 * time.Millisecond, Heartbeat: time.Hour,
		StopGrace: 3 * time.Second, MaxRestarts: 3, MaxBackoff: 2 * time.Second, VCPUs: 8, MemoryMiB: 4096,
	}
	f.start()
	return f
}

func (f *fixture) start() {
	t := f.t
	ctx, cancel := context.WithCancel(context.Background())
	a, err := New(ctx, f.cfg, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	f.agent, f.cancel, f.stopped = a, cancel, make(chan struct{})
	f.srv = httptest.NewServer(a.Handler(http.NotFoundHandler()))
	go func() { _ = a.Run(ctx); close(f.stopped) }()
	t.Cleanup(f.stop)
}

// stop ends the agent process' work without touching the VMs.
func (f *fixture) stop() {
	if f.cancel == nil {
		return
	}
	f.srv.Close()
	f.cancel()
	<-f.stopped
	f.cancel = nil
}

func (f *fixture) do(method, path string, body any, out any) int {
	f.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, f.srv.URL+path, rd)
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

// app sends a data-plane request to instance id.
func (f *fixture) app(id, path string) (int, string) {
	f.t.Helper()
	req, _ := http.NewRequest("GET", f.srv.URL+path, nil)
	req.Header.Set("X-Zeitwork-Instance", id)
	req.Header.Set("X-Zeitwork-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (f *fixture) waitHealthy(id string) Status {
	f.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		var st Status
		f.do("GET", "/instances/"+id, nil, &st)
		if st.Healthy {
			return st
		}
		if st.State == StateFailed || time.Now().After(deadline) {
			console, _ := os.ReadFile(filepath.Join(f.cfg.WorkDir, "instances", id, "console.log"))
			f.t.Fatalf("instance %s not healthy: %+v\nconsole:\n%s", id, st, console)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (f *fixture) fsInfo(id, path string) map[string]any {
	f.t.Helper()
	code, body := f.app(id, "/fs?path="+path)
	if code != 200 {
		f.t.Fatalf("/fs %s: %d %s", path, code, body)
	}
	var m map[string]any
	_ = json.Unmarshal([]byte(body), &m)
	return m
}

// TestNodeAgent runs the whole runtime: an OCI image from a registry is
// converted, booted in microVMs and served through the data plane; layer
// semantics, env, workdir and user are checked inside the VM; VMs are
// isolated; an agent restart re-adopts three running VMs; a crash loop
// backs off and fails; deletion leaves nothing behind.
func TestNodeAgent(t *testing.T) {
	f := newFixture(t)
	var st Status
	if code := f.do("POST", "/instances", Spec{ID: "i1", DeploymentID: "d1", Image: f.ref, Port: 8080, HealthPath: "/healthz", Env: map[string]string{"PROJECT_SECRET": "s3cret"}}, &st); code != 201 {
		t.Fatalf("create: %d %+v", code, st)
	}
	if code := f.do("POST", "/instances", Spec{ID: "i1", Image: f.ref}, nil); code != 200 {
		t.Fatalf("create again = %d, want 200 (idempotent)", code)
	}
	if code := f.do("POST", "/instances", map[string]any{"id": "../x", "image": f.ref}, nil); code != 400 {
		t.Fatalf("bad id = %d, want 400", code)
	}
	if code := f.do("POST", "/instances", map[string]any{"id": "x", "image": f.ref, "bogus": 1}, nil); code != 400 {
		t.Fatalf("unknown field = %d, want 400", code)
	}
	f.do("POST", "/instances", Spec{ID: "i2", Image: f.ref, Port: 8080, HealthPath: "/healthz"}, nil)
	f.do("POST", "/instances", Spec{ID: "i3", Image: f.ref, Port: 8080, HealthPath: "/healthz"}, nil)
	s1 := f.waitHealthy("i1")
	s2 := f.waitHealthy("i2")
	f.waitHealthy("i3")

	if code, body := f.app("i1", "/"); code != 200 || !strings.HasPrefix(body, "hello from") {
		t.Fatalf("data plane: %d %q", code, body)
	}
	_, body := f.app("i1", "/info")
	var info struct {
		UID, GID int
		Workdir  string
		Env      []string
	}
	_ = json.Unmarshal([]byte(body), &info)
	env := strings.Join(info.Env, " ")
	if info.UID != 1000 || info.GID != 1000 || info.Workdir != "/data" || !strings.Contains(env, "FOO=from-image") || !strings.Contains(env, "PROJECT_SECRET=s3cret") {
		t.Fatalf("app sees uid %d gid %d workdir %q env %q", info.UID, info.GID, info.Workdir, env)
	}
	// Layer semantics as the app sees them inside the VM.
	if f.fsInfo("i1", "/gone.txt")["exists"] != false || f.fsInfo("i1", "/opaque/old.txt")["exists"] != false {
		t.Fatal("whiteout or opaque dir not honoured")
	}
	if f.fsInfo("i1", "/opaque/new.txt")["content"] != "kept" || f.fsInfo("i1", "/escaped.txt")["content"] != "contained" {
		t.Fatal("upper layer files missing")
	}
	a, b := f.fsInfo("i1", "/data/original.txt"), f.fsInfo("i1", "/data/hardlink.txt")
	if a["ino"] != b["ino"] || a["mode"] != "-rw-r-----" || a["uid"] != float64(1000) {
		t.Fatalf("hard link/mode/owner: %v %v", a, b)
	}
	if l := f.fsInfo("i1", "/data/outside")["link"]; l != "../../../../etc/passwd" {
		t.Fatalf("symlink target = %v", l)
	}
	// Isolation: a VM reaches neither another VM nor the agent.
	agentPort := f.srv.Listener.Addr().(*net.TCPAddr).Port
	for _, target := range []string{fmt.Sprintf("%s:8080", s2.IP), fmt.Sprintf("%s:%d", hostIP(s1.IP), agentPort)} {
		if _, body := f.app("i1", "/dial?addr="+target); !strings.HasPrefix(body, "blocked") {
			t.Fatalf("VM reached %s: %s", target, body)
		}
	}
	// Logs.
	resp, err := http.NewRequest("GET", f.srv.URL+"/instances/i1/logs", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Header.Set("Authorization", "Bearer "+token)
	lr, err := http.DefaultClient.Do(resp)
	if err != nil {
		t.Fatal(err)
	}
	logs, _ := io.ReadAll(lr.Body)
	lr.Body.Close()
	if !strings.Contains(string(logs), "listening on :8080") {
		t.Fatalf("logs: %s", logs)
	}

	// Agent restart: VMs keep running and are re-adopted.
	pids := map[string]int{}
	for _, id := range []string{"i1", "i2", "i3"} {
		b, _ := os.ReadFile(filepath.Join(f.cfg.WorkDir, "instances", id, "vmm.pid"))
		fmt.Sscan(string(b), new(int))
		var pid int
		fmt.Sscan(string(b), &pid)
		pids[id] = pid
	}
	f.stop()
	for id, pid := range pids {
		if syscall.Kill(pid, 0) != nil {
			t.Fatalf("VM %s (pid %d) died with the agent", id, pid)
		}
	}
	f.start()
	for id, pid := range pids {
		st := f.waitHealthy(id)
		if b, _ := os.ReadFile(filepath.Join(f.cfg.WorkDir, "instances", id, "vmm.pid")); strings.TrimSpace(string(b)) != fmt.Sprint(pid) {
			t.Fatalf("instance %s was restarted instead of adopted", id)
		}
		if code, _ := f.app(id, "/"); code != 200 {
			t.Fatalf("adopted %s does not serve: %d (%+v)", id, code, st)
		}
	}

	// Crash loop: restarts with backoff, then failed.
	f.do("POST", "/instances", Spec{ID: "crash", Image: f.crash, Port: 8080}, nil)
	deadline := time.Now().Add(4 * time.Minute)
	for {
		f.do("GET", "/instances/crash", nil, &st)
		if st.State == StateFailed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("crash loop never failed: %+v", st)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if st.Restarts < 2 || !strings.Contains(st.Error, "crashed") {
		t.Fatalf("crash loop: %+v", st)
	}

	// Delete leaves no tap, process or disk behind.
	for _, id := range []string{"i1", "i2", "i3", "crash"} {
		lease, _ := f.agent.net.Lease(id)
		if code := f.do("DELETE", "/instances/"+id, nil, nil); code != 204 {
			t.Fatalf("delete %s: %d", id, code)
		}
		if pid := pids[id]; pid != 0 && syscall.Kill(pid, 0) == nil {
			t.Fatalf("VM %s still running after delete", id)
		}
		if lease != nil && exec.Command("ip", "link", "show", lease.Tap).Run() == nil {
			t.Fatalf("tap %s left behind", lease.Tap)
		}
		if _, err := os.Stat(filepath.Join(f.cfg.WorkDir, "instances", id)); err == nil {
			t.Fatalf("state dir of %s left behind", id)
		}
	}
}

// hostIP is the tap (host) side of a guest's /30.
func hostIP(guest string) string {
	a := netip.MustParseAddr(guest).As4()
	a[3]--
	return netip.AddrFrom4(a).String()
}
