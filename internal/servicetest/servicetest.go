// Package servicetest runs a service binary the way systemd does — a real
// process configured by environment variables — and checks the contract
// every Zeitwork service keeps: --version, /health, /metrics, one clear
// message for bad configuration, exit 0 after SIGTERM.
package servicetest

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildMu sync.Mutex
	built   = map[string]string{}
)

// Binary returns the path of cmd/<name>: from $ZEITWORK_BIN_DIR when set
// (make test builds there first), otherwise built once into a temp dir.
func Binary(t testing.TB, name string) string {
	t.Helper()
	if dir := os.Getenv("ZEITWORK_BIN_DIR"); dir != "" {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[name]; ok {
		return p
	}
	dir, err := os.MkdirTemp("", "zeitwork-bin-")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, name)
	root := moduleRoot(t)
	cmd := exec.Command("go", "build", "-o", out, "./cmd/"+name)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", name, err, b)
	}
	built[name] = out
	return out
}

func moduleRoot(t testing.TB) string {
	dir, _ := os.Getwd()
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("cannot find go.mod")
		}
		dir = parent
	}
}

// Process is a running service.
type Process struct {
	cmd    *exec.Cmd
	out    *syncBuffer
	done   chan struct{}
	err    error
	Health string
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Start runs bin with env (on top of a minimal PATH/HOME) and waits until
// healthURL answers 200.
func Start(t testing.TB, bin string, env map[string]string, healthURL string) *Process {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	p := &Process{cmd: cmd, out: &syncBuffer{}, done: make(chan struct{}), Health: healthURL}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(healthURL)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p
			}
		}
		select {
		case <-p.done:
			t.Fatalf("%s exited during start-up: %v\n%s", filepath.Base(bin), p.err, p.out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not healthy at %s: %v\n%s", filepath.Base(bin), healthURL, err, p.out.String())
		}
	}
}

// Output returns what the process printed so far.
func (p *Process) Output() string { return p.out.String() }

// Get fetches url and returns status and body.
func Get(t testing.TB, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// StopOK sends SIGTERM and requires exit status 0 within timeout.
func (p *Process) StopOK(t testing.TB, timeout time.Duration) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", p.err, p.out.String())
		}
	case <-time.After(timeout):
		t.Fatalf("did not exit within %s of SIGTERM\n%s", timeout, p.out.String())
	}
}

// CheckContract checks --version, /health (status healthy) and /metrics
// (Go, process and the service's own zeitwork_<svc>_ series).
func CheckContract(t testing.TB, bin string, p *Process, base, metricPrefix string) {
	t.Helper()
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), filepath.Base(bin)+" ") || !strings.Contains(string(out), "commit") {
		t.Fatalf("--version: %v %q", err, out)
	}
	code, body := Get(t, base+"/health")
	if code != 200 || !strings.Contains(body, `"status":"healthy"`) {
		t.Fatalf("/health = %d %s", code, body)
	}
	for _, path := range []string{"/health/live", "/health/ready"} {
		if code, body := Get(t, base+path); code != 200 {
			t.Fatalf("%s = %d %s", path, code, body)
		}
	}
	code, body = Get(t, base+"/metrics")
	for _, want := range []string{"go_goroutines", "process_resident_memory_bytes", metricPrefix + "_build_info"} {
		if code != 200 || !strings.Contains(body, want) {
			t.Fatalf("/metrics (%d) lacks %s", code, want)
		}
	}
}

// ExpectBadConfig runs bin with env and requires a non-zero exit whose
// output names every variable in names in one message.
func ExpectBadConfig(t testing.TB, bin string, env map[string]string, names ...string) {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("exit 0 with bad configuration %v", env)
		}
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("still running with bad configuration %v", env)
	}
	first := strings.SplitN(stderr.String(), "\n", 2)[0]
	for _, n := range names {
		if !strings.Contains(first, n+":") {
			t.Errorf("first error line does not name %s: %q", n, first)
		}
	}
}

// FreeAddr returns a free loopback host:port.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// URL formats http://addr.
func URL(addr string) string { return fmt.Sprintf("http://%s", addr) }
