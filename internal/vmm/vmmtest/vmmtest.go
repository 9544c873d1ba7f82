// Package vmmtest is the contract every vmm backend keeps, as a test suite
// each backend's tests run with Run:
//
//   - Start returns a Machine with the spec's ID, a live PID and an open
//     Done;
//   - DialAgent reaches the guest's init: ready, then config, then the app's
//     log frames;
//   - Adopt of the machine's state directory by another backend instance
//     (an agent restart) re-attaches to the same process while it runs, and
//     DialAgent through the adopted machine carries frames both ways
//     (stop → the app's SIGTERM line);
//   - Kill through the adopted machine ends the process and closes Done on
//     both handles; Kill of an exited machine is a no-op;
//   - Adopt after the process is gone returns vmm.ErrGone (also for a
//     directory that never held a machine);
//   - Start with a missing kernel or root disk fails with an error naming
//     the file (errors.Is fs.ErrNotExist) and leaves no process behind.
//
// A backend that boots real guests here (QEMU) runs it against the real
// kernel and zeitwork-init from BuildKit, with guestapp as the app: one
// boot for the whole suite. A backend that cannot (Firecracker, tested
// against its fake) plays init with PlayInit, which answers as init and
// guestapp would.
package vmmtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/guest"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
	"github.com/zeitwork/zeitwork/internal/vmm"
)

// KernelCacheDir is where the test suites cache the guest kernel.
const KernelCacheDir = "/var/cache/zeitwork-test/kernel"

// AppPath is guestapp inside the kit's root disk.
const AppPath = "/bin/vmmtest-app"

// AppUID is the user the suite runs the app as.
const AppUID = 1000

const tokenEnv = "VMMTEST_TOKEN"

// AppConfig is the config frame the suite sends: guestapp as AppUID, with
// a token that its log lines repeat. The stop grace is long so that a stop
// leaves the app (and the machine) running for Kill.
func AppConfig(token string) *guest.Config {
	return &guest.Config{
		Entrypoint: []string{AppPath}, Env: []string{"PATH=/bin", tokenEnv + "=" + token},
		WorkDir: "/", UID: AppUID, GID: AppUID, Hostname: "vmmtest", StopGraceMS: 10 * 60 * 1000,
	}
}

// StartedLine is what guestapp prints first.
func StartedLine(token string, uid uint32) string {
	return fmt.Sprintf("vmmtest-app %s started uid=%d", token, uid)
}

// TermLine is what guestapp prints for each SIGTERM.
func TermLine(token string) string { return fmt.Sprintf("vmmtest-app %s got SIGTERM", token) }

// Kit is what a real guest boots: the cached Debian kernel with an
// initramfs holding this tree's zeitwork-init, and an ext4 root disk
// holding guestapp at AppPath.
type Kit struct {
	Kernel   *guestkernel.Kernel
	RootDisk string
}

// BuildKit builds zeitwork-init and guestapp into dir and fetches (or
// reuses) the kernel in KernelCacheDir.
func BuildKit(ctx context.Context, dir string) (*Kit, error) {
	initBin := filepath.Join(dir, "init")
	if err := goBuild(ctx, initBin, "github.com/zeitwork/zeitwork/cmd/zeitwork-init"); err != nil {
		return nil, err
	}
	k, err := guestkernel.Ensure(ctx, KernelCacheDir, initBin)
	if err != nil {
		return nil, err
	}
	root := filepath.Join(dir, "root")
	for _, d := range []string{"bin", "etc", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, err
		}
	}
	if err := goBuild(ctx, filepath.Join(root, AppPath), "github.com/zeitwork/zeitwork/internal/vmm/vmmtest/guestapp"); err != nil {
		return nil, err
	}
	img := filepath.Join(dir, "root.ext4")
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-d", root, img, "64M").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("mkfs.ext4: %v: %s", err, out)
	}
	return &Kit{Kernel: k, RootDisk: img}, nil
}

func goBuild(ctx context.Context, out, pkg string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v: %s", pkg, err, b)
	}
	return nil
}

// Harness is what a backend supplies to Run.
type Harness struct {
	// New returns a backend instance. Each call stands for one node agent
	// process: Adopt goes through a fresh one.
	New func(t *testing.T) vmm.VMM
	// Spec returns a valid spec: kernel, initrd and root disk that the
	// backend boots, and a fresh, empty Dir owned by t.
	Spec func(t *testing.T) vmm.Spec
	// Guest, when set, is called once right after the suite's machine
	// started, to play the guest's init (see PlayInit) for a VMM that
	// cannot boot a guest on this host. When nil, the machine boots the
	// kernel and init of its spec for real.
	Guest func(t *testing.T, m vmm.Machine)
	// BootTimeout bounds the wait from Start to the app's first log line
	// (default 90 s: boots are emulated and CI runs packages in parallel).
	BootTimeout time.Duration
}

// Run runs the contract. The machine-lifecycle steps depend on each
// other: after the first failure the rest are not run.
func Run(t *testing.T, h Harness) {
	if h.BootTimeout == 0 {
		h.BootTimeout = 90 * time.Second
	}
	t.Run("InvalidSpec", func(t *testing.T) { testInvalidSpec(t, h) })

	pt := t
	spec := h.Spec(t)
	token := randomToken()
	var m, a vmm.Machine
	steps := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"Start", func(t *testing.T) {
			var err error
			m, err = h.New(t).Start(t.Context(), spec)
			if err != nil {
				t.Fatalf("Start: %v%s", err, diagnostics(spec.Dir))
			}
			if m.ID() != spec.ID {
				t.Errorf("ID() = %q, want %q", m.ID(), spec.ID)
			}
			if err := alive(m.PID()); err != nil {
				t.Fatalf("PID() %d: %v", m.PID(), err)
			}
			if isClosed(m.Done()) {
				t.Fatal("Done is closed right after Start")
			}
			if h.Guest != nil {
				h.Guest(pt, m) // lives as long as the suite
			}
		}},
		{"AgentChannel", func(t *testing.T) {
			conn, r, w := dial(t, m, h.BootTimeout, spec.Dir)
			defer conn.Close()
			f := next(t, r, spec.Dir)
			if f.Type != guest.TypeReady {
				t.Fatalf("first frame %+v, want ready", f)
			}
			if err := w.Send(&guest.Frame{Type: guest.TypeConfig, Config: AppConfig(token)}); err != nil {
				t.Fatal(err)
			}
			waitLog(t, r, StartedLine(token, AppUID), spec.Dir)
		}},
		{"AdoptWhileRunning", func(t *testing.T) {
			var err error
			a, err = h.New(t).Adopt(t.Context(), spec.Dir)
			if err != nil {
				t.Fatalf("Adopt of a running machine: %v", err)
			}
			if a.PID() != m.PID() {
				t.Fatalf("adopted PID %d, started %d", a.PID(), m.PID())
			}
			if isClosed(a.Done()) || isClosed(m.Done()) {
				t.Fatal("Done closed after Adopt")
			}
			// The agent's next connection goes through the adopted
			// machine and carries frames both ways.
			conn, r, w := dial(t, a, 30*time.Second, spec.Dir)
			defer conn.Close()
			if err := w.Send(&guest.Frame{Type: guest.TypeStop}); err != nil {
				t.Fatal(err)
			}
			waitLog(t, r, TermLine(token), spec.Dir)
			if isClosed(a.Done()) {
				t.Fatal("the machine ended after the stop frame; the app keeps running for the grace period")
			}
		}},
		{"Kill", func(t *testing.T) {
			pid := a.PID()
			if err := a.Kill(); err != nil {
				t.Fatalf("Kill through the adopted machine: %v", err)
			}
			for name, mm := range map[string]vmm.Machine{"adopted": a, "started": m} {
				select {
				case <-mm.Done():
				case <-time.After(10 * time.Second):
					t.Fatalf("Done of the %s machine still open 10s after Kill", name)
				}
			}
			if err := alive(pid); err == nil {
				t.Fatalf("pid %d still runs after Kill", pid)
			}
			if err := m.Kill(); err != nil {
				t.Fatalf("Kill of an exited machine: %v", err)
			}
		}},
		{"AdoptAfterExit", func(t *testing.T) {
			if got, err := h.New(t).Adopt(t.Context(), spec.Dir); !errors.Is(err, vmm.ErrGone) {
				if got != nil {
					got.Kill()
				}
				t.Fatalf("Adopt after the process is gone = %v, want ErrGone", err)
			}
			if _, err := h.New(t).Adopt(t.Context(), t.TempDir()); !errors.Is(err, vmm.ErrGone) {
				t.Fatalf("Adopt of an empty directory = %v, want ErrGone", err)
			}
		}},
	}
	t.Cleanup(func() {
		if m != nil {
			m.Kill()
		}
		if a != nil {
			a.Kill()
		}
	})
	for _, s := range steps {
		if !t.Run(s.name, s.fn) {
			return
		}
	}
}

// testInvalidSpec: a missing kernel or root disk fails Start with an
// error naming it, and no process is left running for the machine.
func testInvalidSpec(t *testing.T, h Harness) {
	cases := []struct {
		name string
		set  func(s *vmm.Spec, missing string)
	}{
		{"MissingKernel", func(s *vmm.Spec, p string) { s.Kernel = p }},
		{"MissingRootDisk", func(s *vmm.Spec, p string) { s.RootDisk = p }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			spec := h.Spec(t)
			missing := filepath.Join(t.TempDir(), "missing-file")
			c.set(&spec, missing)
			m, err := h.New(t).Start(t.Context(), spec)
			if err == nil {
				m.Kill()
				t.Fatal("Start succeeded")
			}
			if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
				t.Errorf("Start error %q: want one naming %s (errors.Is fs.ErrNotExist)", err, missing)
			}
			if pids := processesMentioning(spec.Dir); len(pids) > 0 {
				t.Errorf("processes %v still run for the failed machine", pids)
			}
			if b, err := os.ReadFile(filepath.Join(spec.Dir, "vmm.pid")); err == nil {
				if pid, _ := strconv.Atoi(strings.TrimSpace(string(b))); pid > 0 && alive(pid) == nil {
					t.Errorf("pid %d from vmm.pid still runs", pid)
				}
			}
		})
	}
}

// PlayInit stands in for zeitwork-init and guestapp on l, the guest end
// of the agent channel, for a VMM that cannot boot a guest here: every
// connection l accepts becomes the channel's current one (as init's vsock
// listener does), each is greeted with ready until the config arrives;
// then it sends StartedLine for the config's token and uid, and TermLine
// for every stop frame. A config that does not run AppPath gets an exit
// frame (127), as init's failed exec would. It ends when t does.
func PlayInit(t *testing.T, l net.Listener) {
	ch := guest.NewChannel()
	t.Cleanup(func() {
		l.Close()
		ch.Close()
	})
	go func() { // ends when l is closed
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			ch.Accept(c)
		}
	}()
	go func() { // ends when ch is closed
		ch.Greet(&guest.Frame{Type: guest.TypeReady})
		var cfg *guest.Config
		for cfg == nil {
			f, err := ch.Next()
			if errors.Is(err, guest.ErrClosed) {
				return
			}
			if err == nil && f.Type == guest.TypeConfig {
				cfg = f.Config
			}
		}
		ch.Greet(nil)
		if argv := cfg.Argv(); argv[0] != AppPath {
			code := 127
			_ = ch.Send(&guest.Frame{Type: guest.TypeExit, Code: &code, Error: "cannot start " + argv[0]})
			return
		}
		var token string
		for _, kv := range cfg.Env {
			if v, ok := strings.CutPrefix(kv, tokenEnv+"="); ok {
				token = v
			}
		}
		_ = ch.Send(&guest.Frame{Type: guest.TypeLog, Stream: "stdout", Line: StartedLine(token, cfg.UID)})
		for {
			f, err := ch.Next()
			if errors.Is(err, guest.ErrClosed) {
				return
			}
			if err == nil && f.Type == guest.TypeStop {
				_ = ch.Send(&guest.Frame{Type: guest.TypeLog, Stream: "stdout", Line: TermLine(token)})
			}
		}
	}()
}

// dial opens the agent channel of m within timeout; the connection's
// deadline is the same timeout.
func dial(t *testing.T, m vmm.Machine, timeout time.Duration, dir string) (net.Conn, *guest.Reader, *guest.Writer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	conn, err := guest.Dial(ctx, m.DialAgent)
	if err != nil {
		t.Fatalf("DialAgent: %v%s", err, diagnostics(dir))
	}
	conn.SetDeadline(time.Now().Add(timeout))
	return conn, guest.NewReader(conn), guest.NewWriter(conn)
}

func next(t *testing.T, r *guest.Reader, dir string) *guest.Frame {
	t.Helper()
	f, err := r.Next()
	if err != nil {
		t.Fatalf("agent channel: %v%s", err, diagnostics(dir))
	}
	return f
}

// waitLog reads frames until a stdout log frame with line; an exit frame
// fails.
func waitLog(t *testing.T, r *guest.Reader, line, dir string) {
	t.Helper()
	for {
		f := next(t, r, dir)
		switch f.Type {
		case guest.TypeExit:
			t.Fatalf("app exited (%d %s) before logging %q%s", *f.Code, f.Error, line, diagnostics(dir))
		case guest.TypeLog:
			t.Logf("guest %s: %s", f.Stream, f.Line)
			if f.Stream == "stdout" && f.Line == line {
				return
			}
		}
	}
}

// alive reports whether pid is a running (not zombie) process.
func alive(pid int) error {
	if pid <= 0 {
		return fmt.Errorf("pid %d", pid)
	}
	if err := syscall.Kill(pid, 0); err != nil {
		return err
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return err
	}
	// "pid (comm) S ...": the state follows the last ')'.
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) && b[i+2] == 'Z' {
		return errors.New("zombie")
	}
	return nil
}

// processesMentioning lists the processes whose command line names dir.
func processesMentioning(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(dir)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// diagnostics is the tail of the machine's logs, for failure messages.
func diagnostics(dir string) string {
	var sb strings.Builder
	logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, p := range logs {
		b, err := os.ReadFile(p)
		if err != nil || len(bytes.TrimSpace(b)) == 0 {
			continue
		}
		if len(b) > 3000 {
			b = b[len(b)-3000:]
		}
		fmt.Fprintf(&sb, "\n--- %s:\n%s", filepath.Base(p), b)
	}
	return sb.String()
}

func randomToken() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}
