package builder

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/builderimage"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
	"github.com/zeitwork/zeitwork/internal/hostnet"
	"github.com/zeitwork/zeitwork/internal/ocitest"
	"github.com/zeitwork/zeitwork/internal/rootfs"
	"github.com/zeitwork/zeitwork/internal/vmm/qemu"
	"github.com/zeitwork/zeitwork/internal/vmm/vmmtest"
)

// BuilderCacheDir is where the test suites cache the builder root disk.
const BuilderCacheDir = "/var/cache/zeitwork-test/builder"

type fixture struct {
	t       *testing.T
	b       *Builder
	reg     string
	base    string
	sources map[string][]byte // archive path → tar
	hostLn  net.Listener      // a host service builds must not reach
	work    string
	net     *hostnet.Manager
}

func newFixture(t *testing.T) *fixture {
	if os.Getuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the builder test needs root on CI (taps, nftables)")
		}
		t.Skip("needs root (taps, nftables, QEMU)")
	}
	ctx := t.Context()
	dir := t.TempDir()
	initBin := filepath.Join(dir, "zeitwork-init")
	cmd := exec.Command("go", "build", "-o", initBin, "github.com/zeitwork/zeitwork/cmd/zeitwork-init")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build zeitwork-init: %v\n%s", err, out)
	}
	k, err := guestkernel.Ensure(ctx, vmmtest.KernelCacheDir, initBin)
	if err != nil {
		t.Fatal(err)
	}
	disk, err := builderimage.Ensure(ctx, BuilderCacheDir, initBin)
	if err != nil {
		t.Fatal(err)
	}
	q, err := qemu.New()
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, reg: ocitest.Registry(t), sources: map[string][]byte{}, work: filepath.Join(dir, "work")}
	f.base = f.reg + "/base/busybox:1"
	ocitest.Push(ctx, t, f.base, ocitest.Busybox(t))
	f.net, err = hostnet.New(hostnet.Config{Subnet: netip.MustParsePrefix("10.236.0.0/24"), StateDir: filepath.Join(dir, "net")})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.net.Setup(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.net.Teardown() })
	// A service on every host address: a builder must not reach it.
	f.hostLn, err = net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "host service") })}
	go srv.Serve(f.hostLn)
	t.Cleanup(func() { srv.Close() })
	f.b, err = New(Config{WorkDir: f.work, Concurrency: 2, VCPUs: 2, MemoryMiB: 768, DiskMiB: 1024},
		Deps{VMM: q, Net: f.net, Kernel: k.BzImage, Initrd: k.Initrd, RootDisk: func(context.Context) (string, error) { return disk, nil }, Log: slog.New(slog.DiscardHandler),
			Source: func(ctx context.Context, src build.Source, w io.Writer) error {
				b, ok := f.sources[src.ArchivePath]
				if !ok {
					return fmt.Errorf("no archive %s", src.ArchivePath)
				}
				_, err := w.Write(b)
				return err
			}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.b.Close)
	return f
}

// source stores a source tree and returns its archive path.
func (f *fixture) source(files map[string]string) string {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, content := range files {
		_ = tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content)), ModTime: time.Unix(1700000000, 0)})
		_, _ = tw.Write([]byte(content))
	}
	_ = tw.Close()
	p := fmt.Sprintf("/src/%d", len(f.sources))
	f.sources[p] = buf.Bytes()
	return p
}

func (f *fixture) run(id, archive string, timeout int, args map[string]string) build.Status {
	f.t.Helper()
	return f.runSpec(build.Spec{ID: id, DeploymentID: "d-" + id, ProjectID: "p1", Source: build.Source{ArchivePath: archive},
		Image: f.reg + "/acme/web:" + id, TimeoutS: timeout, BuildArgs: args})
}

func (f *fixture) runSpec(spec build.Spec) build.Status {
	f.t.Helper()
	id, timeout := spec.ID, spec.TimeoutS
	if _, err := f.b.Start(spec); err != nil {
		f.t.Fatal(err)
	}
	deadline := time.Now().Add(time.Duration(timeout)*time.Second + 2*time.Minute)
	for time.Now().Before(deadline) {
		st, err := f.b.Get(id)
		if err != nil {
			f.t.Fatal(err)
		}
		if build.Terminal(st.State) {
			lines, _, _, _ := f.b.Logs(id, 0)
			for _, l := range lines {
				f.t.Logf("%s [%s] %s", id, l.Stream, l.Line)
			}
			return st
		}
		time.Sleep(200 * time.Millisecond)
	}
	f.t.Fatalf("build %s did not end", id)
	return build.Status{}
}

// file reads one file of a pushed image.
func (f *fixture) file(ref, path string) string {
	f.t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		f.t.Fatal(err)
	}
	img, err := remote.Image(r)
	if err != nil {
		f.t.Fatal(err)
	}
	dir := f.t.TempDir()
	if _, err := rootfs.Flatten(f.t.Context(), img, dir, 1<<30); err != nil {
		f.t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, path))
	if err != nil {
		f.t.Fatalf("%s in %s: %v", path, ref, err)
	}
	return string(b)
}

const dockerfile = `FROM %[1]s AS build
ARG MESSAGE=unset
RUN mkdir -p /out && echo "built with $MESSAGE" > /out/stage1
COPY . /src
RUN test ! -e /src/secret.txt && cat /src/app.txt >> /out/stage1
# A builder reaches nothing but its allowlist: not its host's services.
RUN GW=$(ip route | awk '/default/ {print $3}'); \
    if wget -T 3 -q -O- "http://$GW:%[2]d/" 2>/dev/null; then echo "REACHED HOST"; exit 1; fi; \
    echo "host $GW:%[2]d unreachable"
FROM %[1]s
COPY --from=build /out/stage1 /srv/index.html
CMD ["httpd", "-f", "-p", "8080", "-h", "/srv"]
`

// TestBuildInMicroVM builds a multi-stage Dockerfile in a real builder
// VM, rebuilds it warm after a one-line change, and checks a failing
// Dockerfile and a build killed at its deadline, each leaving nothing
// behind.
func TestBuildInMicroVM(t *testing.T) {
	f := newFixture(t)
	port := f.hostLn.Addr().(*net.TCPAddr).Port
	files := map[string]string{
		"Dockerfile":    fmt.Sprintf(dockerfile, f.base, port),
		".dockerignore": "secret.txt\n",
		"secret.txt":    "do not ship",
		"app.txt":       "version one\n",
	}
	st := f.run("cold", f.source(files), 600, map[string]string{"MESSAGE": "zeitwork"})
	if st.State != build.StateSucceeded {
		t.Fatalf("cold build: %s: %s", st.State, st.Error)
	}
	if !strings.HasPrefix(st.Image, f.reg+"/acme/web@sha256:") {
		t.Fatalf("image %q", st.Image)
	}
	if got := f.file(st.Image, "srv/index.html"); got != "built with zeitwork\nversion one\n" {
		t.Fatalf("index.html = %q", got)
	}
	if st.Steps < 5 {
		t.Fatalf("steps %d", st.Steps)
	}

	files["app.txt"] = "version two\n"
	warm := f.run("warm", f.source(files), 600, map[string]string{"MESSAGE": "zeitwork"})
	if warm.State != build.StateSucceeded {
		t.Fatalf("warm build: %s: %s", warm.State, warm.Error)
	}
	if got := f.file(warm.Image, "srv/index.html"); got != "built with zeitwork\nversion two\n" {
		t.Fatalf("index.html = %q", got)
	}
	if warm.CacheHits < 2 {
		t.Fatalf("warm build reused %d steps from the cache; want the steps before COPY", warm.CacheHits)
	}

	files["Dockerfile"] = fmt.Sprintf("FROM %s\nRUN echo about to fail && exit 7\n", f.base)
	bad := f.run("broken", f.source(files), 600, nil)
	if bad.State != build.StateFailed || !strings.Contains(bad.Error, "about to fail") {
		t.Fatalf("broken Dockerfile: %s: %q", bad.State, bad.Error)
	}

	delete(files, "Dockerfile")
	none := f.run("nodockerfile", f.source(files), 600, nil)
	if none.State != build.StateFailed || !strings.Contains(none.Error, "no Dockerfile at Dockerfile") {
		t.Fatalf("no Dockerfile: %s: %q", none.State, none.Error)
	}

	// Limits: a build that fills its disk, one that exhausts its memory.
	files["Dockerfile"] = fmt.Sprintf("FROM %s\nRUN dd if=/dev/zero of=/fill bs=1M count=2048\n", f.base)
	full := f.runSpec(build.Spec{ID: "diskfull", ProjectID: "p2", Source: build.Source{ArchivePath: f.source(files)},
		Image: f.reg + "/acme/limits:disk", TimeoutS: 600, DiskMiB: 512})
	if full.State != build.StateFailed || !strings.Contains(full.Error, "filled its disk (512 MiB)") {
		t.Fatalf("disk full: %s: %q", full.State, full.Error)
	}
	files["Dockerfile"] = fmt.Sprintf("FROM %s\nRUN awk 'BEGIN { s = \"x\"; while (1) s = s s }'\n", f.base)
	oom := f.runSpec(build.Spec{ID: "oom", ProjectID: "p2", Source: build.Source{ArchivePath: f.source(files)},
		Image: f.reg + "/acme/limits:oom", TimeoutS: 600, DiskMiB: 512, MemoryMiB: 384})
	if oom.State != build.StateFailed || !strings.Contains(oom.Error, "ran out of memory (384 MiB)") {
		t.Fatalf("out of memory: %s: %q", oom.State, oom.Error)
	}

	files["Dockerfile"] = fmt.Sprintf("FROM %s\nRUN echo sleeping && sleep 600\n", f.base)
	slow := f.run("deadline", f.source(files), 45, nil)
	if slow.State != build.StateFailed || !strings.Contains(slow.Error, "time limit") {
		t.Fatalf("deadline: %s: %q", slow.State, slow.Error)
	}
	f.assertNothingLeft()
	// Failed builds pushed nothing.
	for _, ref := range []string{"acme/web:broken", "acme/web:nodockerfile", "acme/web:deadline", "acme/limits:disk", "acme/limits:oom"} {
		r, _ := name.ParseReference(f.reg+"/"+ref, name.Insecure)
		if _, err := remote.Head(r); err == nil {
			t.Fatalf("a failed build left %s in the registry", ref)
		}
	}
}

// assertNothingLeft checks that no build left a VM, a tap, a lease or a
// file behind.
func (f *fixture) assertNothingLeft() {
	f.t.Helper()
	ents, _ := os.ReadDir(filepath.Join(f.work, "builds"))
	if len(ents) != 0 {
		f.t.Fatalf("build directories left: %v", ents)
	}
	if l := f.net.Leases(); len(l) != 0 {
		f.t.Fatalf("leases left: %v", l)
	}
	out, _ := exec.Command("ip", "-o", "link", "show").Output()
	if strings.Contains(string(out), f.net.TapPrefix()) {
		f.t.Fatalf("taps left:\n%s", out)
	}
	// This test's builder VMs only (other suites may be building too).
	out, _ = exec.Command("pgrep", "-f", filepath.Join(f.work, "builds")).Output()
	if len(bytes.TrimSpace(out)) > 0 {
		f.t.Fatalf("builder VMs left: %s", out)
	}
}
