package qemu

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/guest"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
	"github.com/zeitwork/zeitwork/internal/vmm"
)

// bootKit builds zeitwork-init, fetches the guest kernel and builds a tiny
// root disk holding a shell-free static program.
func bootKit(t *testing.T) (*guestkernel.Kernel, string) {
	t.Helper()
	dir := t.TempDir()
	initBin := filepath.Join(dir, "init")
	build := exec.Command("go", "build", "-o", initBin, "github.com/zeitwork/zeitwork/cmd/zeitwork-init")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build init: %v\n%s", err, out)
	}
	k, err := guestkernel.Ensure(t.Context(), "/var/cache/zeitwork-test/kernel", initBin)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "root")
	for _, d := range []string{"bin", "etc", "app"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	app := exec.Command("go", "build", "-o", filepath.Join(root, "bin", "hello"), "github.com/zeitwork/zeitwork/examples/hello")
	app.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := app.CombinedOutput(); err != nil {
		t.Fatalf("build app: %v\n%s", err, out)
	}
	img := filepath.Join(dir, "root.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, img, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return k, img
}

// TestBootRunStop boots a real microVM, runs a program with the given
// environment as a non-root user, reads its output over the agent channel,
// stops it and gets its exit code; then re-adopts and kills a second one.
func TestBootRunStop(t *testing.T) {
	k, img := bootKit(t)
	q, err := New()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("accelerator: %s", q.Accel)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	m, err := q.Start(ctx, vmm.Spec{ID: "t1", Kernel: k.BzImage, Initrd: k.Initrd, RootDisk: img, Dir: dir, MemoryMiB: 128})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	conn, err := guest.Dial(ctx, m.DialAgent)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	w, r := guest.NewWriter(conn), guest.NewReader(conn)
	err = w.Send(&guest.Frame{Type: guest.TypeConfig, Config: &guest.Config{
		Entrypoint: []string{"/bin/hello"}, Env: []string{"PORT=8080", "APP_VERSION=vm-test"},
		WorkDir: "/app", UID: 1000, GID: 1000, Hostname: "t1", StopGraceMS: 2000,
	}})
	if err != nil {
		t.Fatal(err)
	}
	go func() { <-ctx.Done(); conn.Close() }()
	sawListen := false
	for !sawListen {
		f, err := r.Next()
		if err != nil {
			console, _ := os.ReadFile(filepath.Join(dir, "console.log"))
			t.Fatalf("agent channel: %v\nconsole:\n%s", err, console)
		}
		if f.Type == guest.TypeExit {
			t.Fatalf("app exited early: %d %s", *f.Code, f.Error)
		}
		if f.Type == guest.TypeLog {
			t.Logf("guest %s: %s", f.Stream, f.Line)
			sawListen = strings.Contains(f.Line, "hello vm-test listening on :8080")
		}
	}
	if err := w.Send(&guest.Frame{Type: guest.TypeStop}); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := r.Next()
		if err != nil {
			t.Fatalf("no exit frame: %v", err)
		}
		if f.Type == guest.TypeExit {
			if *f.Code != 128+15 {
				t.Fatalf("exit code %d, want 143 (SIGTERM)", *f.Code)
			}
			break
		}
	}
	select {
	case <-m.Done():
	case <-time.After(time.Minute):
		t.Fatal("VM did not power off after the app exited")
	}

	// Adopt: a new backend instance re-attaches by state dir.
	if _, err := q.Adopt(ctx, dir); !errors.Is(err, vmm.ErrGone) {
		t.Fatalf("Adopt of a stopped VM = %v, want ErrGone", err)
	}
	dir2 := t.TempDir()
	m2, err := q.Start(ctx, vmm.Spec{ID: "t2", Kernel: k.BzImage, Initrd: k.Initrd, RootDisk: img, Dir: dir2, MemoryMiB: 128})
	if err != nil {
		t.Fatal(err)
	}
	q2, _ := New()
	a, err := q2.Adopt(ctx, dir2)
	if err != nil {
		t.Fatal(err)
	}
	if a.PID() != m2.PID() {
		t.Fatalf("adopted pid %d, started %d", a.PID(), m2.PID())
	}
	if err := a.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m2.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("kill through the adopted handle did not stop the VM")
	}
}
