package upgrade

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
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

	"github.com/zeitwork/zeitwork/internal/devcluster"
)

const newVersion = "v9.9.9-upgrade-test"

var services = []string{"zeitwork-operator", "zeitwork-node-agent", "zeitwork-edge-proxy", "zeitwork-load-balancer"}

// TestRollingUpgrade runs the rolling upgrade runbook on a live platform
// under constant load through the load balancer: two operators (the
// follower first, then the leader, whose lock moves), the node agent
// (restart; VMs and data plane keep serving), the edge proxy and the load
// balancer (SIGUSR2: listening sockets handed to the new binary). Not one
// request may fail, and every service must report the new version.
func TestRollingUpgrade(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a platform and a microVM")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the upgrade test needs root (VM networking) on CI")
		}
		t.Skip("needs root for VM networking")
	}
	start := time.Now()
	src := os.Getenv("ZEITWORK_BIN_DIR")
	if src == "" {
		src = "../../bin"
	}
	bin := t.TempDir() // the installed binaries: v1 now, replaced one by one
	for _, b := range append([]string{"zeitwork", "zeitwork-init"}, services...) {
		install(t, filepath.Join(src, b), filepath.Join(bin, b))
	}
	hello := filepath.Join(src, "examples", "hello")
	if _, err := os.Stat(hello); err != nil {
		t.Fatalf("sample app missing (make build): %v", err)
	}
	// The new release, built while the platform starts.
	v2 := t.TempDir()
	built := make(chan error, 1)
	go func() { // waited for below
		args := []string{"build", "-trimpath", "-ldflags", "-X github.com/zeitwork/zeitwork/internal/buildinfo.Version=" + newVersion, "-o", v2 + "/"}
		for _, s := range services {
			args = append(args, "./cmd/"+s)
		}
		cmd := exec.Command("go", args...)
		cmd.Dir = "../.."
		out, err := cmd.CombinedOutput()
		if err != nil {
			err = fmt.Errorf("go build: %v\n%s", err, out)
		}
		built <- err
	}()
	t.Cleanup(func() { <-built })

	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()
	state := t.TempDir()
	c, err := devcluster.Start(ctx, devcluster.Config{
		BinDir: bin, StateDir: state, Regions: []string{"upgrade"}, FirstIP: "127.0.7.1",
		Env: map[string]string{
			"DEPLOY_TIMEOUT": "120s", "NODE_DOWN_AFTER": "60s", "VM_SUBNET": "10.242.0.0/24",
			"OPERATOR_URL": "http://127.0.7.1:8080,http://127.0.7.2:8080",
		},
		// The load below comes from one address.
		EdgeEnv: map[string]string{"RATE_LIMIT_RPS": "100000", "RATE_LIMIT_BURST": "100000"},
	})
	if err != nil {
		t.Fatal(err)
	}
	var moved []int // processes started by handovers, not tracked by the cluster
	t.Cleanup(func() {
		for _, pid := range moved {
			stopPID(pid, 30*time.Second)
		}
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
	})
	var op2 *devcluster.Proc
	t.Cleanup(func() {
		if op2 != nil {
			_ = op2.Stop(30 * time.Second)
		}
		_ = c.Stop()
		c.StopVMs()
	})
	r := c.Regions[0]
	opAddr := []string{"127.0.7.1:8080", "127.0.7.2:8080"}
	op2 = operator(c, bin, state, opAddr[1])
	if err := op2.Start(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}

	// An app on the platform.
	token, err := c.Bootstrap(ctx, "demo", "dev@zeitwork.test")
	if err != nil {
		t.Fatal(err)
	}
	ref, err := c.Registry.PushSample(ctx, "demo/hello", "v1", devcluster.SampleImage{Binary: hello, Env: map[string]string{"APP_VERSION": "v1"}, User: "1000:1000"})
	if err != nil {
		t.Fatal(err)
	}
	cliCfg := filepath.Join(t.TempDir(), "cli.json")
	cli := func(args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "zeitwork"), args...)
		cmd.Env = append(os.Environ(), "ZEITWORK_CONFIG="+cliCfg, "NO_COLOR=1")
		out, err := cmd.Output()
		if err != nil {
			var stderr []byte
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = ee.Stderr
			}
			t.Fatalf("zeitwork %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr)
		}
		return string(out)
	}
	cli("login", "--api-url", c.OperatorURL, "--token", token)
	cli("projects", "create", "hello", "--port", "8080", "--health-path", "/healthz", "--min-instances", "1")
	urls := strings.Fields(cli("deploy", "--project", "hello", "--image", ref, "--wait"))
	if len(urls) == 0 || !strings.HasPrefix(urls[0], "https://") {
		t.Fatalf("deploy printed %q", urls)
	}
	host := strings.TrimPrefix(urls[0], "https://")
	t.Logf("deployed %s after %s", host, time.Since(start).Round(time.Second))

	if err := <-built; err != nil {
		t.Fatal(err)
	}
	built <- nil // for the cleanup

	// Constant bounded load through the load balancer, a new connection
	// per request, half HTTPS (:8082 → edge :443), half HTTP (:8085 →
	// edge :8083).
	pem, _ := os.ReadFile(c.CA.CertFile)
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	var (
		ok, failed atomic.Int64
		failures   sync.Map
		stop       = make(chan struct{})
		wg         sync.WaitGroup
		// Keep-alive clients stop before the load balancer's upgrade: an
		// L4 balancer cannot ask a client to reconnect, so the old one
		// relays their connections until they end or LB_DRAIN_TIMEOUT
		// cuts them.
		stopKeepAlive = make(chan struct{})
		kaWG          sync.WaitGroup
		kaClients     []*http.Client
	)
	loadEnd := time.Now().Add(4 * time.Minute)
	// 8 clients open a new connection per request (they reach whichever
	// process accepts); 2 keep theirs (HTTP/2 and HTTP/1.1 keep-alive:
	// they see the old processes drain).
	type worker struct {
		name, scheme, port string
		keepAlive, h2      bool
	}
	var workers []worker
	for w := range 8 {
		if w%2 == 0 {
			workers = append(workers, worker{name: "https", scheme: "https", port: "8082"})
		} else {
			workers = append(workers, worker{name: "http", scheme: "http", port: "8085"})
		}
	}
	workers = append(workers, worker{name: "h2 keep-alive", scheme: "https", port: "8082", keepAlive: true, h2: true},
		worker{name: "http keep-alive", scheme: "http", port: "8085", keepAlive: true})
	for _, w := range workers {
		scheme, port := w.name, w.port
		client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			DisableKeepAlives: !w.keepAlive, ForceAttemptHTTP2: w.h2, TLSClientConfig: &tls.Config{RootCAs: roots},
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, "tcp", net.JoinHostPort(r.IP, port))
			},
		}}
		url := w.scheme + "://" + host + "/"
		if w.h2 {
			resp, err := client.Get(url)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.ProtoMajor != 2 {
				t.Fatalf("the h2 client speaks %s", resp.Proto)
			}
		}
		wgOf, stopOf := &wg, stop
		if w.keepAlive {
			wgOf, stopOf = &kaWG, stopKeepAlive
			kaClients = append(kaClients, client)
		}
		wgOf.Go(func() {
			tick := time.NewTicker(20 * time.Millisecond) // 50 requests/s per worker
			defer tick.Stop()
			for n := 0; n < 20_000 && time.Now().Before(loadEnd); n++ {
				select {
				case <-stop:
					return
				case <-stopOf:
					return
				case <-tick.C:
				}
				code, body, err := get(client, url)
				if err != nil || code != 200 || !strings.Contains(body, "hello from v1") {
					failed.Add(1)
					failures.Store(fmt.Sprintf("%s %s: %d %v %.80q", time.Now().Format("15:04:05.000"), scheme, code, err, body), true)
					continue
				}
				ok.Add(1)
			}
		})
	}
	stopLoad := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
		kaWG.Wait()
	}
	defer stopLoad()
	time.Sleep(time.Second)

	// Each step counts the requests served while it ran and in the 3 s
	// after, when the old process drains.
	step := func(name string, f func()) {
		t.Helper()
		before, fb := ok.Load(), failed.Load()
		s := time.Now()
		f()
		took := time.Since(s).Round(100 * time.Millisecond)
		time.Sleep(3 * time.Second)
		served := ok.Load() - before
		t.Logf("%s upgraded in %s; %d requests served meanwhile and in the 3 s after, %d failed", name, took, served, failed.Load()-fb)
		if served < 10 {
			t.Errorf("%s: only %d requests served around the upgrade; the load is too thin to tell", name, served)
		}
	}
	// 1. Operators: the follower first, the leader last; its lock moves.
	ops := []**devcluster.Proc{&c.Operator, &op2}
	leader := -1
	waitFor(t, 30*time.Second, "an operator to lead", func() bool {
		for i, a := range opAddr {
			if metric("http://"+a+"/metrics", "zeitwork_operator_leader") == "1" {
				leader = i
				return true
			}
		}
		return false
	})
	follower := 1 - leader
	install(t, filepath.Join(v2, "zeitwork-operator"), filepath.Join(bin, "zeitwork-operator"))
	for _, i := range []int{follower, leader} {
		step(fmt.Sprintf("operator %s (leader: %v)", opAddr[i], i == leader), func() {
			if err := (*ops[i]).Stop(30 * time.Second); err != nil {
				t.Fatal(err)
			}
			if i == leader {
				waitFor(t, 30*time.Second, "the leader lock to move", func() bool {
					return metric("http://"+opAddr[follower]+"/metrics", "zeitwork_operator_leader") == "1"
				})
			}
			p := operator(c, bin, state, opAddr[i])
			if err := p.Start(ctx, 2*time.Minute); err != nil {
				t.Fatal(err)
			}
			*ops[i] = p
			waitVersion(t, "http://"+opAddr[i]+"/health")
		})
	}
	if metric("http://"+opAddr[follower]+"/metrics", "zeitwork_operator_leader") != "1" {
		t.Errorf("the leader lock did not stay with %s after the old leader came back", opAddr[follower])
	}

	// 2. The node agent: restarted; its VM and data plane keep serving.
	install(t, filepath.Join(v2, "zeitwork-node-agent"), filepath.Join(bin, "zeitwork-node-agent"))
	step("node agent", func() {
		if err := r.NodeAgents[0].Stop(60 * time.Second); err != nil {
			t.Fatal(err)
		}
		if err := c.RestartNodeAgent(ctx, 0, 0); err != nil {
			t.Fatal(err)
		}
		waitVersion(t, "http://127.0.7.11:8081/health")
	})

	// 3 and 4. Edge proxy and load balancer: the new binary takes the
	// listening sockets over (SIGUSR2), the old process drains and exits.
	for _, s := range []struct {
		name   string
		proc   *devcluster.Proc
		health string
	}{
		{"zeitwork-edge-proxy", r.Edge, "http://" + r.IP + ":8083/health"},
		{"zeitwork-load-balancer", r.LB, "http://" + r.IP + ":8084/health"},
	} {
		if s.name == "zeitwork-load-balancer" {
			close(stopKeepAlive)
			kaWG.Wait()
			for _, c := range kaClients {
				c.CloseIdleConnections()
			}
		}
		path := filepath.Join(bin, s.name)
		old := pidOf(t, path)
		install(t, filepath.Join(v2, s.name), path)
		step(s.name, func() {
			if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
				t.Fatal(err)
			}
			select {
			case <-s.proc.Done():
			case <-time.After(90 * time.Second):
				t.Fatalf("old %s (pid %d) still running 90 s after SIGUSR2", s.name, old)
			}
			pid := pidOf(t, path)
			moved = append(moved, pid)
			if pid == old {
				t.Fatalf("%s: no new process", s.name)
			}
			waitVersion(t, s.health)
		})
	}
	stopLoad()

	for _, h := range []string{"http://" + opAddr[0] + "/health", "http://" + opAddr[1] + "/health", "http://127.0.7.11:8081/health",
		"http://" + r.IP + ":8083/health", "http://" + r.IP + ":8084/health"} {
		if v := version(h); v != newVersion {
			t.Errorf("%s reports version %q, want %q", h, v, newVersion)
		}
	}
	if m := metric("http://"+r.IP+":8083/metrics", `zeitwork_edge_proxy_build_info{commit=`); m != "1" {
		t.Errorf("edge build_info: %q", m)
	}
	t.Logf("load: %d requests served, %d failed; test took %s", ok.Load(), failed.Load(), time.Since(start).Round(time.Second))
	failures.Range(func(k, _ any) bool { t.Log(k); return true })
	if failed.Load() > 0 {
		t.Fatalf("%d requests failed during the rolling upgrade", failed.Load())
	}
	if ok.Load() < 100 {
		t.Fatalf("only %d requests served under load", ok.Load())
	}
}

// operator returns a (not yet started) operator of the cluster listening
// on addr.
func operator(c *devcluster.Cluster, bin, state, addr string) *devcluster.Proc {
	env := c.OperatorEnv()
	env["LISTEN_ADDR"] = addr
	name := "operator-" + strings.ReplaceAll(addr, ":", "-")
	return &devcluster.Proc{Name: name, Path: filepath.Join(bin, "zeitwork-operator"), Env: env,
		LogFile: filepath.Join(state, "logs", name+".log"), Health: "http://" + addr + "/health/live"}
}

// install copies src over dst as a package manager does: a new file
// renamed into place, so a running dst keeps its (now deleted) inode.
func install(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	tmp := dst + ".new"
	if err := os.WriteFile(tmp, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
}

// pidOf finds the one process running the binary at path (or its
// replaced, deleted predecessor).
func pidOf(t *testing.T, path string) int {
	t.Helper()
	var pids []int
	exes, _ := filepath.Glob("/proc/[0-9]*/exe")
	for _, e := range exes {
		target, err := os.Readlink(e)
		if err != nil || (target != path && target != path+" (deleted)") {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(e, "/proc/%d/exe", &pid); err == nil && !zombie(pid) {
			pids = append(pids, pid)
		}
	}
	if len(pids) != 1 {
		t.Fatalf("want one process running %s, found %v", path, pids)
	}
	return pids[0]
}

func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z' || s[i+2] == 'X'
}

// stopPID stops a process this test does not own as a child.
func stopPID(pid int, timeout time.Duration) {
	_ = syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(timeout)
	for !zombie(pid) && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

func get(c *http.Client, url string) (int, string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

var plain = &http.Client{Timeout: 5 * time.Second}

func version(url string) string {
	resp, err := plain.Get(url)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	var h struct{ Version string }
	_ = json.NewDecoder(resp.Body).Decode(&h)
	return h.Version
}

func waitVersion(t *testing.T, url string) {
	t.Helper()
	waitFor(t, 60*time.Second, url+" to report "+newVersion, func() bool { return version(url) == newVersion })
}

// metric returns the value of the first sample whose line starts with
// prefix.
func metric(url, prefix string) string {
	resp, err := plain.Get(url)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, prefix) {
			f := strings.Fields(l)
			return f[len(f)-1]
		}
	}
	return ""
}

func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
