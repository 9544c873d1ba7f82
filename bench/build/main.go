// Command build benchmarks builds from source: a small multi-stage Go app
// (a Go toolchain stage, then a busybox stage with the binary) built cold
// and again after a one-line change, in a Zeitwork builder microVM
// (internal/builder: source drive, layer-cache disk, egress proxy,
// buildah in the VM, push from the host) against the same builder —
// buildah with the same flags, through the same internal/buildrunner
// code, then the same push — run directly on the host, in the same run.
// The ratios are the cost of the VM's isolation.
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/zeitwork/zeitwork/bench/benchdoc"
	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/builder"
	"github.com/zeitwork/zeitwork/internal/builderimage"
	"github.com/zeitwork/zeitwork/internal/buildrunner"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
	"github.com/zeitwork/zeitwork/internal/hostnet"
	ib "github.com/zeitwork/zeitwork/internal/imagebuild"
	"github.com/zeitwork/zeitwork/internal/vmm/qemu"
)

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

const dockerfile = `FROM %[1]s/bench/golang:1 AS build
WORKDIR /src
COPY go.mod main.go ./
RUN --mount=type=cache,target=/root/.cache/go-build CGO_ENABLED=0 GOFLAGS=-trimpath go build -o /out/app .
FROM %[1]s/bench/busybox:1
COPY --from=build /out/app /app
CMD ["/app"]
`

const mainGo = `package main

import (
	"fmt"
	"os"
	"strings"
)

func main() {
	greeting := %q
	fmt.Fprintln(os.Stdout, strings.ToUpper(greeting))
}
`

func run() error {
	ctx := context.Background()
	if os.Getuid() != 0 {
		return errors.New("bench-build needs root (taps, nftables)")
	}
	dir, err := os.MkdirTemp("", "bench-build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	initBin := filepath.Join(dir, "zeitwork-init")
	cmd := exec.Command("go", "build", "-o", initBin, "./cmd/zeitwork-init")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build zeitwork-init: %v: %s", err, out)
	}
	k, err := guestkernel.Ensure(ctx, "/var/cache/zeitwork/kernel", initBin)
	if err != nil {
		return err
	}
	disk, err := builderimage.Ensure(ctx, "/var/cache/zeitwork/builder", initBin)
	if err != nil {
		return err
	}
	// The registry both builders pull the base images from and push to.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}
	go srv.Serve(ln) // ends with srv.Close below
	defer srv.Close()
	reg := ln.Addr().String()
	log.Printf("pushing base images (busybox, and a Go toolchain image from %s)", goroot())
	bbLayer, err := ib.BusyboxLayer()
	if err != nil {
		return err
	}
	bb, err := ib.Image(ib.BusyboxConfig, bbLayer)
	if err != nil {
		return err
	}
	if _, err := ib.Push(ctx, reg+"/bench/busybox:1", bb); err != nil {
		return err
	}
	goLayer, err := goToolchain()
	if err != nil {
		return err
	}
	golang, err := ib.Image(ib.Config{Env: []string{"PATH=/usr/local/go/bin:/bin", "GOTOOLCHAIN=local", "GOPROXY=off", "HOME=/root"},
		WorkingDir: "/src", Cmd: []string{"/bin/sh"}}, bbLayer, goLayer)
	if err != nil {
		return err
	}
	if _, err := ib.Push(ctx, reg+"/bench/golang:1", golang); err != nil {
		return err
	}
	src := func(greeting string) map[string]string {
		return map[string]string{
			"Dockerfile": fmt.Sprintf(dockerfile, reg),
			"go.mod":     "module bench/app\n\ngo 1.22\n",
			"main.go":    fmt.Sprintf(mainGo, greeting),
		}
	}
	cold, warm := src("hello from the cold build"), src("hello from the warm build")

	// The host: buildah with the runner's flags, then the same push.
	hostRun := func(name string, files map[string]string, hd string) (time.Duration, error) {
		start := time.Now()
		p := buildrunner.Paths{Storage: filepath.Join(hd, "storage"), RunRoot: filepath.Join(hd, "run"), Tmp: filepath.Join(hd, "tmp"),
			Config: filepath.Join(hd, "etc"), Source: filepath.Join(hd, "src-"+name), Output: filepath.Join(hd, "out-"+name+".tar")}
		if err := writeTree(p.Source, files); err != nil {
			return 0, err
		}
		if err := os.WriteFile(p.Output, nil, 0o644); err != nil {
			return 0, err
		}
		var logb bytes.Buffer
		job := buildrunner.Job{Dockerfile: "Dockerfile", Context: ".", Tag: "localhost/zeitwork-build:" + name, Insecure: []string{reg}}
		if err := buildrunner.Build(ctx, job, p, &logb); err != nil {
			return 0, fmt.Errorf("host build %s: %v\n%s", name, err, tail(logb.String()))
		}
		if _, err := builder.Push(ctx, p.Output, reg+"/bench/app:host-"+name, true); err != nil {
			return 0, err
		}
		return time.Since(start), nil
	}
	hd := filepath.Join(dir, "host")
	log.Printf("host: cold build")
	hostCold, err := hostRun("cold", cold, hd)
	if err != nil {
		return err
	}
	log.Printf("host: cold %s; warm build", hostCold.Round(time.Millisecond))
	hostWarm, err := hostRun("warm", warm, hd)
	if err != nil {
		return err
	}
	log.Printf("host: warm %s", hostWarm.Round(time.Millisecond))
	_ = exec.Command("buildah", "--root", filepath.Join(hd, "storage"), "--runroot", filepath.Join(hd, "run"), "rm", "--all").Run()
	_ = unmountUnder(hd)

	// The builder microVM.
	q, err := qemu.New()
	if err != nil {
		return err
	}
	hn, err := hostnet.New(hostnet.Config{Subnet: netip.MustParsePrefix("10.233.0.0/24"), StateDir: filepath.Join(dir, "net")})
	if err != nil {
		return err
	}
	if err := hn.Setup(); err != nil {
		return err
	}
	defer hn.Teardown()
	sources := map[string][]byte{"/cold": tarOf(cold), "/warm": tarOf(warm)}
	b, err := builder.New(builder.Config{WorkDir: filepath.Join(dir, "vm"), Concurrency: 1, VCPUs: 2, MemoryMiB: 2048, DiskMiB: 4096},
		builder.Deps{VMM: q, Net: hn, Kernel: k.BzImage, Initrd: k.Initrd, Log: slog.New(slog.DiscardHandler),
			RootDisk: func(context.Context) (string, error) { return disk, nil },
			Source: func(ctx context.Context, s build.Source, w io.Writer) error {
				_, err := w.Write(sources[s.ArchivePath])
				return err
			}})
	if err != nil {
		return err
	}
	defer b.Close()
	// phases splits a VM build's wall time by its log: until the builder
	// VM's first line (source, disks, network, boot), buildah, and the
	// export and push after its last step.
	phases := func(id string, start time.Time) string {
		lines, _, _, _ := b.Logs(id, 0)
		var up, pushing, done time.Time
		for _, l := range lines {
			switch {
			case l.Stream == "zeitwork" && strings.HasPrefix(l.Line, "builder VM up") && up.IsZero():
				up = l.Time
			case l.Stream == "zeitwork" && strings.HasPrefix(l.Line, "pushing "):
				pushing = l.Time
			case l.Stream == "zeitwork" && strings.HasPrefix(l.Line, "pushed "):
				done = l.Time
			}
		}
		if up.IsZero() || pushing.IsZero() || done.IsZero() {
			return "?"
		}
		return fmt.Sprintf("to VM up %.1f s, in the VM %.1f s, push from the host %.1f s",
			up.Sub(start).Seconds(), pushing.Sub(up).Seconds(), done.Sub(pushing).Seconds())
	}
	vmRun := func(name string) (time.Duration, build.Status, error) {
		start := time.Now()
		spec := build.Spec{ID: "bench-" + name, ProjectID: "bench", Source: build.Source{ArchivePath: "/" + name},
			Image: reg + "/bench/app:vm-" + name, TimeoutS: 3600}
		if _, err := b.Start(spec); err != nil {
			return 0, build.Status{}, err
		}
		for {
			st, err := b.Get(spec.ID)
			if err != nil {
				return 0, st, err
			}
			if build.Terminal(st.State) {
				if st.State != build.StateSucceeded {
					return 0, st, fmt.Errorf("VM build %s: %s", name, st.Error)
				}
				return time.Since(start), st, nil
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	log.Printf("VM: cold build")
	coldStart := time.Now()
	vmCold, _, err := vmRun("cold")
	if err != nil {
		return err
	}
	coldPhases := phases("bench-cold", coldStart)
	log.Printf("VM: cold %s (%s); warm build", vmCold.Round(time.Millisecond), coldPhases)
	warmStart := time.Now()
	vmWarm, wst, err := vmRun("warm")
	if err != nil {
		return err
	}
	warmPhases := phases("bench-warm", warmStart)
	log.Printf("VM: warm %s (%d of %d steps from the cache; %s)", vmWarm.Round(time.Millisecond), wst.CacheHits, wst.Steps, warmPhases)

	accel := string(q.Accel)
	var sb strings.Builder
	fmt.Fprintf(&sb, "Builds from source (`make bench-build`): a two-stage Go app (Go toolchain stage with a `RUN --mount=type=cache` build cache, busybox final stage), cold and after a one-line change. Zeitwork: builder microVM (QEMU, %s, 2 vCPU, 2 GiB), buildah %s inside, source drive, layer-cache disk, egress proxy, push from the host. Host: the same buildah, flags and push, run directly on the host. Wall time from request to pushed image.\n\n", accel, buildahVersion())
	fmt.Fprintf(&sb, "| | host buildah (s) | Zeitwork builder VM (s) | ratio |\n|---|---|---|---|\n")
	fmt.Fprintf(&sb, "| cold (empty cache) | %.1f | %.1f | %.2f |\n", hostCold.Seconds(), vmCold.Seconds(), vmCold.Seconds()/hostCold.Seconds())
	fmt.Fprintf(&sb, "| warm (one line changed) | %.1f | %.1f | %.2f |\n\n", hostWarm.Seconds(), vmWarm.Seconds(), vmWarm.Seconds()/hostWarm.Seconds())
	fmt.Fprintf(&sb, "Where the VM's time went — cold: %s; warm: %s.\n\n", coldPhases, warmPhases)
	fmt.Fprintf(&sb, "The warm VM build answered %d of %d steps from the project's layer cache. Under TCG every instruction of the VM is emulated, so the compile step dominates both ratios here; on KVM hosts the VM runs at native speed and the ratio is the boot and disk overhead only.\n", wst.CacheHits, wst.Steps)
	fmt.Print(sb.String())
	if err := benchdoc.Write("build", sb.String()); err != nil {
		log.Printf("cannot record results: %v", err)
	}
	fmt.Printf("bench-build: cold_s=%.1f warm_s=%.1f warm_ratio_vs_host_buildah=%.2f overhead_ratio_vs_host_buildah=%.2f accel=%s\n",
		vmCold.Seconds(), vmWarm.Seconds(), vmWarm.Seconds()/hostWarm.Seconds(), vmCold.Seconds()/hostCold.Seconds(), accel)
	return nil
}

func goroot() string {
	out, err := exec.Command("go", "env", "GOROOT").Output()
	if err != nil {
		return "/usr/local/go"
	}
	return strings.TrimSpace(string(out))
}

// goToolchain is a layer of the host's Go toolchain: what `go build` of a
// small program needs (the go command, compile, link, asm and the
// standard library's sources).
func goToolchain() (v1.Layer, error) {
	root := goroot()
	var entries []ib.Entry
	keep := func(rel string, d fs.DirEntry) bool {
		switch {
		case rel == "bin/go", rel == "go.env", rel == "VERSION", strings.HasPrefix(rel, "pkg/include"):
			return true
		case strings.HasPrefix(rel, "pkg/tool/linux_amd64/"):
			n := filepath.Base(rel)
			return n == "compile" || n == "link" || n == "asm" || n == "buildid"
		case strings.HasPrefix(rel, "src/"):
			return !strings.HasPrefix(rel, "src/cmd/") && !strings.Contains(rel, "/testdata/") && !strings.HasSuffix(rel, "_test.go")
		}
		return d.IsDir() && (rel == "bin" || rel == "pkg" || rel == "pkg/tool" || rel == "pkg/tool/linux_amd64" || rel == "src")
	}
	entries = append(entries, ib.Entry{Name: "usr", Type: tar.TypeDir}, ib.Entry{Name: "usr/local", Type: tar.TypeDir}, ib.Entry{Name: "usr/local/go", Type: tar.TypeDir})
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		if !keep(rel, d) {
			if d.IsDir() && !strings.HasPrefix(rel, "src") && !strings.HasPrefix(rel, "pkg") {
				return filepath.SkipDir
			}
			return nil
		}
		name := "usr/local/go/" + rel
		if d.IsDir() {
			entries = append(entries, ib.Entry{Name: name, Type: tar.TypeDir})
			return nil
		}
		if d.Type()&fs.ModeSymlink != 0 {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		entries = append(entries, ib.Entry{Name: name, Mode: int64(fi.Mode().Perm()), Data: b})
		return nil
	})
	if err != nil {
		return nil, err
	}
	return ib.Layer(entries...)
}

func writeTree(dir string, files map[string]string) error {
	for n, c := range files {
		p := filepath.Join(dir, n)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, []byte(c), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func tarOf(files map[string]string) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for n, c := range files {
		_ = tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(c)), ModTime: time.Unix(1700000000, 0)})
		_, _ = tw.Write([]byte(c))
	}
	_ = tw.Close()
	return buf.Bytes()
}

// unmountUnder lazily unmounts what buildah left mounted under dir.
func unmountUnder(dir string) error {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && strings.HasPrefix(f[1], dir) {
			_ = exec.Command("umount", "-l", f[1]).Run()
		}
	}
	return nil
}

func buildahVersion() string {
	out, _ := exec.Command("buildah", "--version").Output()
	f := strings.Fields(string(out))
	if len(f) >= 3 {
		return f[2]
	}
	return "?"
}

func tail(s string) string {
	if len(s) > 3000 {
		return s[len(s)-3000:]
	}
	return s
}
