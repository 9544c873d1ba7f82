package e2e

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/dataplane"
	"github.com/zeitwork/zeitwork/internal/devcluster"
)

// binDir returns a directory with all binaries: $ZEITWORK_BIN_DIR (make
// test builds it first) or a fresh build.
func binDir(t *testing.T) string {
	if d := os.Getenv("ZEITWORK_BIN_DIR"); d != "" {
		if _, err := os.Stat(filepath.Join(d, "examples", "hello")); err == nil {
			return d
		}
	}
	d := t.TempDir()
	for _, b := range []string{"zeitwork-operator", "zeitwork-node-agent", "zeitwork-edge-proxy", "zeitwork-load-balancer", "zeitwork", "zeitwork-init"} {
		build(t, "./cmd/"+b, filepath.Join(d, b))
	}
	build(t, "./examples/hello", filepath.Join(d, "examples", "hello"))
	return d
}

func build(t *testing.T, pkg, out string) {
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
}

type suite struct {
	t     *testing.T
	bin   string
	c     *devcluster.Cluster
	token string
	ca    *x509.CertPool
	cfg   string // CLI config file
}

func startCluster(t *testing.T, cfg devcluster.Config) *suite {
	s := &suite{t: t, bin: binDir(t)}
	cfg.BinDir = s.bin
	cfg.StateDir = t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, err := devcluster.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.c = c
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(cfg.StateDir, "logs", "*.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				if len(b) > 4000 {
					b = b[len(b)-4000:]
				}
				t.Logf("--- %s (tail):\n%s", filepath.Base(l), b)
			}
		}
		_ = c.Stop()
		c.StopVMs()
	})
	if s.token, err = c.Bootstrap(ctx, "demo", "dev@zeitwork.test"); err != nil {
		t.Fatal(err)
	}
	pem, _ := os.ReadFile(c.CA.CertFile)
	s.ca = x509.NewCertPool()
	s.ca.AppendCertsFromPEM(pem)
	s.cfg = filepath.Join(t.TempDir(), "cli.json")
	if code, _, errs := s.cli("login", "--api-url", c.OperatorURL, "--token", s.token); code != 0 {
		t.Fatalf("login: %s", errs)
	}
	return s
}

// cli runs the real zeitwork binary.
func (s *suite) cli(args ...string) (int, string, string) {
	cmd := exec.Command(filepath.Join(s.bin, "zeitwork"), args...)
	cmd.Env = append(os.Environ(), "ZEITWORK_CONFIG="+s.cfg, "NO_COLOR=1")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		s.t.Fatal(err)
	}
	return code, out.String(), errb.String()
}

func (s *suite) push(tag string, env map[string]string) string {
	ref, err := s.c.Registry.PushSample(context.Background(), "demo/hello", tag, devcluster.SampleImage{
		Binary: filepath.Join(s.bin, "examples", "hello"), Env: env, User: "1000:1000"})
	if err != nil {
		s.t.Fatal(err)
	}
	return ref
}

// client reaches a region's load balancer from source address from.
func (s *suite) client(region int, from string) *http.Client {
	lb := s.c.Regions[region].IP
	d := &net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			_, port, _ := net.SplitHostPort(addr)
			if port == "443" {
				port = "8082"
			} else {
				port = "8085"
			}
			return d.DialContext(ctx, "tcp", net.JoinHostPort(lb, port))
		},
		TLSClientConfig: &tls.Config{RootCAs: s.ca}, MaxIdleConnsPerHost: 4,
	}}
}

func get(c *http.Client, url string) (int, string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

func (s *suite) waitBody(c *http.Client, url, want string, within time.Duration) {
	s.t.Helper()
	deadline := time.Now().Add(within)
	for {
		code, body, err := get(c, url)
		if err == nil && code == 200 && strings.Contains(body, want) {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s never said %q (last: %d %q %v)", url, want, code, body, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func lines(s string) []string { return strings.Split(strings.TrimSpace(s), "\n") }

// TestPlatform is the user's story on one region: deploy with the CLI,
// zero-downtime cut-over, a failing deploy, rollback, a GitHub push, rate
// limiting, a node agent crash and a database outage — all through
// LB → edge → node agent → microVM.
func TestPlatform(t *testing.T) {
	s := startCluster(t, devcluster.Config{
		Env:     map[string]string{"DEPLOY_TIMEOUT": "60s", "RETENTION": "10m", "NODE_DOWN_AFTER": "60s"},
		EdgeEnv: map[string]string{"RATE_LIMIT_RPS": "100", "RATE_LIMIT_BURST": "200"},
	})
	v1 := s.push("v1", map[string]string{"APP_VERSION": "v1"})
	v2 := s.push("v2", map[string]string{"APP_VERSION": "v2"})
	v3 := s.push("v3", map[string]string{"APP_VERSION": "v3", "FAIL_HEALTH": "1"})
	sha := "5fa3c0ffee5fa3c0ffee5fa3c0ffee5fa3c0ffee"
	s.push(sha, map[string]string{"APP_VERSION": "pushed"})

	if code, out, errs := s.cli("projects", "create", "hello", "--port", "8080", "--health-path", "/healthz", "--min-instances", "2",
		"--github-repo", "demo/hello", "--image-template", s.c.Registry.Addr+"/demo/hello:{sha}"); code != 0 {
		t.Fatalf("projects create: %d %s %s", code, out, errs)
	}
	// 1. Deploy v1 with the CLI: versioned URL and production alias serve it.
	code, out, errs := s.cli("deploy", "--project", "hello", "--image", v1, "--wait")
	if code != 0 {
		t.Fatalf("deploy v1: %d\n%s\n%s", code, out, errs)
	}
	if !strings.Contains(errs, "active") || !strings.Contains(errs, "local 2/2 healthy") {
		t.Errorf("deploy did not show its phases: %s", errs)
	}
	urls := lines(out)
	if len(urls) != 2 || !strings.HasPrefix(urls[0], "https://hello-") || urls[1] != "https://hello-demo.zeitwork.test" {
		t.Fatalf("deploy printed %q", out)
	}
	v1URL, prodURL := urls[0], urls[1]
	c := s.client(0, "")
	for _, u := range []string{v1URL, prodURL} {
		if code, body, err := get(c, u+"/"); err != nil || code != 200 || !strings.Contains(body, "hello from v1") {
			t.Fatalf("%s through the LB: %d %q %v", u, code, body, err)
		}
	}
	if code, body, _ := get(c, "http://hello-demo.zeitwork.test/"); code != 200 || !strings.Contains(body, "v1") {
		t.Fatalf("plain HTTP through the LB: %d %q", code, body)
	}
	var info struct {
		UID     int
		Headers map[string][]string
	}
	_, body, _ := get(c, prodURL+"/info")
	_ = json.Unmarshal([]byte(body), &info)
	if info.UID != 1000 || !strings.Contains(strings.Join(info.Headers["X-Forwarded-For"], ","), "127.0.0.1") {
		t.Fatalf("app sees %s", body)
	}

	// 2. Deploy v2 under constant load: no failed request, v1 → v2 once.
	var failures, total atomic.Int64
	var mu sync.Mutex
	var seen []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			lc := s.client(0, "")
			for {
				select {
				case <-stop:
					return
				default:
				}
				code, body, err := get(lc, prodURL+"/")
				total.Add(1)
				if err != nil || code != 200 {
					failures.Add(1)
					t.Logf("failed request during cut-over: %d %v %q", code, err, body)
				} else {
					mu.Lock()
					v := strings.Fields(body)[2]
					if len(seen) == 0 || seen[len(seen)-1] != v {
						seen = append(seen, v)
					}
					mu.Unlock()
				}
				time.Sleep(25 * time.Millisecond)
			}
		})
	}
	code, out, errs = s.cli("deploy", "--project", "hello", "--image", v2)
	if code != 0 {
		t.Fatalf("deploy v2: %d %s %s", code, out, errs)
	}
	v2URL := lines(out)[0]
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()
	if failures.Load() != 0 || total.Load() < 50 {
		t.Fatalf("%d of %d requests failed during the cut-over", failures.Load(), total.Load())
	}
	if fmt.Sprint(seen) != "[v1 v2]" {
		t.Fatalf("versions seen in order: %v", seen)
	}
	if _, body, _ := get(c, v1URL+"/"); !strings.Contains(body, "v1") {
		t.Fatalf("v1 no longer on its own URL: %q", body)
	}

	// 3. A broken v3: the CLI fails with the reason, traffic stays on v2.
	code, out, errs = s.cli("deploy", "--project", "hello", "--image", v3)
	if code == 0 || !strings.Contains(errs, "health check") {
		t.Fatalf("broken deploy: exit %d\n%s\n%s", code, out, errs)
	}
	if _, body, _ := get(c, prodURL+"/"); !strings.Contains(body, "v2") {
		t.Fatalf("production left v2: %q", body)
	}

	// 4. Rollback: back on v1 within a second.
	code, out, errs = s.cli("deployments", "ls", "--project", "hello", "--json")
	var dl struct {
		Deployments []apiclient.Deployment `json:"deployments"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &dl) != nil || len(dl.Deployments) != 3 {
		t.Fatalf("deployments ls: %d %s %s", code, out, errs)
	}
	v1ID := dl.Deployments[2].ID
	start := time.Now()
	if code, out, errs := s.cli("rollback", "--project", "hello", v1ID); code != 0 {
		t.Fatalf("rollback: %d %s %s", code, out, errs)
	}
	s.waitBody(c, prodURL+"/", "hello from v1", 5*time.Second)
	t.Logf("rollback: production served v1 %s after the command returned", time.Since(start).Round(time.Millisecond))
	if time.Since(start) > 3*time.Second {
		t.Errorf("rollback took %s", time.Since(start))
	}

	// 5. A signed GitHub push deploys that commit.
	payload := []byte(fmt.Sprintf(`{"ref":"refs/heads/main","after":"%s","deleted":false,"repository":{"full_name":"demo/hello"}}`, sha))
	mac := hmac.New(sha256.New, []byte(s.c.WebhookSecret))
	mac.Write(payload)
	req, _ := http.NewRequest("POST", s.c.OperatorURL+"/api/v1/github/webhook", bytes.NewReader(payload))
	req.Header.Set("X-GitHub-Event", "push")
	req.Header.Set("X-GitHub-Delivery", "e2e-1")
	req.Header.Set("X-Hub-Signature-256", "sha256="+hex.EncodeToString(mac.Sum(nil)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 202 {
		t.Fatalf("webhook: %v %v", resp, err)
	}
	resp.Body.Close()
	s.waitBody(c, prodURL+"/", "hello from pushed", 3*time.Minute)

	// 7. Rate limiting: one client gets 429s, another is unaffected.
	hammer := s.client(0, "127.0.0.77")
	var limited atomic.Int64
	var hw sync.WaitGroup
	for range 8 {
		hw.Go(func() {
			for range 150 {
				if limited.Load() > 0 {
					return
				}
				if code, _, _ := get(hammer, prodURL+"/healthz"); code == 429 {
					limited.Add(1)
				}
			}
		})
	}
	hw.Wait()
	if limited.Load() == 0 {
		t.Fatal("the hammering client was never limited")
	}
	if code, _, _ := get(c, prodURL+"/"); code != 200 {
		t.Fatalf("another client was limited: %d", code)
	}

	// 8. kill -9 the node agent: its VMs and its data plane process keep
	// running (they outlive it), so the app keeps serving through the
	// load balancer while the agent is dead; the restarted agent re-adopts
	// the VMs without rebooting them and keeps the same data plane.
	agent := s.c.Regions[0].NodeAgents[0]
	pidsBefore := vmPIDs(t, s)
	workDir := agent.Env["VM_WORK_DIR"]
	dataPlane := dataplane.RunningPID(workDir)
	if dataPlane == 0 {
		t.Fatal("no data plane process runs for the node agent")
	}
	agent.Kill()
	for _, pid := range pidsBefore {
		if syscall.Kill(pid, 0) != nil {
			t.Fatalf("VM process %d died with its node agent", pid)
		}
	}
	served := 0
	for until := time.Now().Add(4 * time.Second); time.Now().Before(until); time.Sleep(100 * time.Millisecond) {
		if agent.Running() {
			t.Fatal("the node agent is still running")
		}
		if code, body, err := get(c, prodURL+"/"); code != 200 || !strings.Contains(body, "hello from pushed") {
			t.Fatalf("with the node agent dead (after %d good requests): %d %q %v", served, code, body, err)
		}
		served++
	}
	health := strings.TrimSuffix(agent.Health, "/live")
	if code, body, _ := get(http.DefaultClient, health); code != 503 || !strings.Contains(body, "agent_unavailable") {
		t.Fatalf("the agent's /health with the agent dead: %d %q", code, body)
	}
	if err := s.c.RestartNodeAgent(context.Background(), 0, 0); err != nil {
		t.Fatal(err)
	}
	if got := dataplane.RunningPID(workDir); got != dataPlane {
		t.Fatalf("the restarted agent replaced the data plane (%d → %d) instead of keeping it", dataPlane, got)
	}
	s.waitBody(c, prodURL+"/", "hello from pushed", 60*time.Second)
	for _, pid := range pidsBefore {
		if syscall.Kill(pid, 0) != nil {
			t.Fatalf("VM process %d was restarted instead of re-adopted", pid)
		}
	}

	// Stop PostgreSQL for 30 s: the app keeps serving.
	if err := s.c.DB.Stop(); err != nil {
		t.Fatal(err)
	}
	until := time.Now().Add(30 * time.Second)
	for time.Now().Before(until) {
		if code, body, err := get(c, prodURL+"/"); code != 200 {
			t.Fatalf("with PostgreSQL down: %d %q %v", code, body, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err := s.c.RestartDB(context.Background()); err != nil {
		t.Fatal(err)
	}
	if code, out, errs := s.cli("deployments", "ls", "--project", "hello"); code != 0 || !strings.Contains(out, "active*") {
		t.Fatalf("after the database came back: %d %s %s", code, out, errs)
	}
	_ = v2URL
}

// vmPIDs lists the running VM processes of the cluster's node agents.
func vmPIDs(t *testing.T, s *suite) []int {
	t.Helper()
	return vmPIDsOf(t, s, filepath.Join(s.c.StateDir(), "nodes", "*"))
}

// vmPIDsOf lists the running VM processes under a node agent's work dir
// (a glob).
func vmPIDsOf(t *testing.T, s *suite, workDir string) []int {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(workDir, "instances", "*", "vmm.pid"))
	var pids []int
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(string(b), &pid); err == nil && syscall.Kill(pid, 0) == nil {
			pids = append(pids, pid)
		}
	}
	if len(pids) == 0 {
		t.Fatal("no running VM processes found")
	}
	return pids
}
