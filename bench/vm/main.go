// Command vm benchmarks the microVM runtime: spawn → init running and
// spawn → app listening over 20+ boots against the floor (the same VMM and
// kernel booting a trivial init that powers off at once), host memory per
// idle VM, and image → rootfs conversion against `tar -x` + `mkfs.ext4 -d`
// of the same layers.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/zeitwork/zeitwork/bench/benchdoc"
	"github.com/zeitwork/zeitwork/internal/guest"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
	ib "github.com/zeitwork/zeitwork/internal/imagebuild"
	"github.com/zeitwork/zeitwork/internal/rootfs"
	"github.com/zeitwork/zeitwork/internal/vmm"
	"github.com/zeitwork/zeitwork/internal/vmm/qemu"
)

const boots = 20

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

func build(pkg, out string) error {
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v: %s", pkg, err, b)
	}
	return nil
}

const trivialInit = `package main

import "syscall"

func main() { syscall.Sync(); _ = syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF); select {} }
`

func run() error {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "bench-vm-")
	defer os.RemoveAll(dir)
	initBin := filepath.Join(dir, "zeitwork-init")
	if err := build("./cmd/zeitwork-init", initBin); err != nil {
		return err
	}
	floorSrc := filepath.Join(dir, "floor", "main.go")
	_ = os.MkdirAll(filepath.Dir(floorSrc), 0o755)
	_ = os.WriteFile(floorSrc, []byte(trivialInit), 0o644)
	floorBin := filepath.Join(dir, "floor-init")
	if err := build(floorSrc, floorBin); err != nil {
		return err
	}
	kdir := "/var/cache/zeitwork/kernel"
	k, err := guestkernel.Ensure(ctx, kdir, initBin)
	if err != nil {
		return err
	}
	kf, err := guestkernel.Ensure(ctx, kdir, floorBin)
	if err != nil {
		return err
	}
	// Root disk with the sample app.
	tree := filepath.Join(dir, "tree")
	_ = os.MkdirAll(filepath.Join(tree, "app"), 0o755)
	if err := build("./examples/hello", filepath.Join(tree, "app", "hello")); err != nil {
		return err
	}
	disk := filepath.Join(dir, "root.ext4")
	if err := rootfs.MakeExt4(ctx, tree, disk, 32<<20); err != nil {
		return err
	}
	q, err := qemu.New()
	if err != nil {
		return err
	}
	log.Printf("accelerator: %s; %d boots each", q.Accel, boots)

	var floor, toInit, toApp []time.Duration
	for i := range boots {
		d := filepath.Join(dir, "floor", strconv.Itoa(i))
		_ = os.MkdirAll(d, 0o755)
		start := time.Now()
		m, err := q.Start(ctx, vmm.Spec{ID: "floor", Kernel: kf.BzImage, Initrd: kf.Initrd, RootDisk: disk, Dir: d, MemoryMiB: 128})
		if err != nil {
			return err
		}
		select {
		case <-m.Done():
			floor = append(floor, time.Since(start))
		case <-time.After(2 * time.Minute):
			_ = m.Kill()
			return fmt.Errorf("floor VM did not power off")
		}
	}
	var idle []vmm.Machine
	for i := range boots {
		d := filepath.Join(dir, "vm", strconv.Itoa(i))
		_ = os.MkdirAll(d, 0o755)
		start := time.Now()
		m, err := q.Start(ctx, vmm.Spec{ID: "vm" + strconv.Itoa(i), Kernel: k.BzImage, Initrd: k.Initrd, RootDisk: disk, Dir: d, MemoryMiB: 128})
		if err != nil {
			return err
		}
		tInit, tApp, conn, err := bootApp(ctx, m, start)
		if err != nil {
			_ = m.Kill()
			return err
		}
		toInit, toApp = append(toInit, tInit), append(toApp, tApp)
		if i < 3 { // keep three running to measure idle memory
			idle = append(idle, m)
			continue
		}
		_ = guest.NewWriter(conn).Send(&guest.Frame{Type: guest.TypeStop})
		select {
		case <-m.Done():
		case <-time.After(time.Minute):
			_ = m.Kill()
		}
		conn.Close()
	}
	time.Sleep(5 * time.Second)
	var pss []float64
	for _, m := range idle {
		pss = append(pss, pssMiB(m.PID()))
		_ = m.Kill()
	}
	memPerVM := mean(pss)
	avail := memAvailableMiB()

	convZW, convTar, gb, err := conversion(ctx, dir)
	if err != nil {
		return err
	}
	p := func(ds []time.Duration, q float64) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[int(float64(len(s)-1)*q)].Milliseconds())
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## MicroVMs (make bench-vm)\n\nRun %s, QEMU microvm, accelerator **%s**, 1 vCPU / 128 MiB guests, Debian cloud kernel %s, %d boots per figure, one at a time.\n\n", time.Now().UTC().Format("2006-01-02"), q.Accel, k.Version, boots)
	fmt.Fprintf(&b, "| measure | p50 (ms) | p95 (ms) |\n|---|---|---|\n")
	fmt.Fprintf(&b, "| floor: spawn → trivial init powered off | %.0f | %.0f |\n", p(floor, .5), p(floor, .95))
	fmt.Fprintf(&b, "| spawn → zeitwork-init running (ready frame on the host) | %.0f | %.0f |\n", p(toInit, .5), p(toInit, .95))
	fmt.Fprintf(&b, "| spawn → app listening (its first log line on the host) | %.0f | %.0f |\n\n", p(toApp, .5), p(toApp, .95))
	fmt.Fprintf(&b, "Host memory per idle VM (PSS of the QEMU process, app running): %.0f MiB. With %.0f MiB available, about %d such VMs fit by memory.\n\n", memPerVM, avail, int(avail/memPerVM))
	fmt.Fprintf(&b, "Image → rootfs for %.2f GB of layer content: Zeitwork (flatten through os.Root + mkfs.ext4 -d) %.1f s/GB, `tar -x` + `mkfs.ext4 -d` %.1f s/GB, ratio %.2f.\n", gb, convZW/gb, convTar/gb, convZW/convTar)
	fmt.Print(b.String())
	if err := benchdoc.Write("vm", b.String()); err != nil {
		log.Printf("cannot record results: %v", err)
	}
	fmt.Printf("bench-vm: boot_to_app_p50_ms=%.0f floor_p50_ms=%.0f ratio_vs_floor=%.2f host_mib_per_idle_vm=%.0f rootfs_ratio_vs_tar_mkfs=%.2f\n",
		p(toApp, .5), p(floor, .5), p(toApp, .5)/p(floor, .5), memPerVM, convZW/convTar)
	return nil
}

// bootApp drives the agent channel: it sends the run configuration when
// init is ready and waits for the app's first log line.
func bootApp(ctx context.Context, m vmm.Machine, start time.Time) (time.Duration, time.Duration, io.ReadWriteCloser, error) {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	conn, err := guest.Dial(cctx, m.DialAgent)
	if err != nil {
		return 0, 0, nil, err
	}
	r, w := guest.NewReader(conn), guest.NewWriter(conn)
	var tInit time.Duration
	for {
		f, err := r.Next()
		if err != nil {
			return 0, 0, nil, fmt.Errorf("agent channel: %w", err)
		}
		switch f.Type {
		case guest.TypeReady:
			tInit = time.Since(start)
			_ = w.Send(&guest.Frame{Type: guest.TypeConfig, Config: &guest.Config{Entrypoint: []string{"/app/hello"}, Env: []string{"PORT=8080"}, StopGraceMS: 1000}})
		case guest.TypeLog:
			if strings.Contains(f.Line, "listening") {
				return tInit, time.Since(start), conn, nil
			}
		case guest.TypeExit:
			return 0, 0, nil, fmt.Errorf("app exited: %s", f.Error)
		}
	}
}

func pssMiB(pid int) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) >= 2 && fields[0] == "Pss:" {
			kb, _ := strconv.ParseFloat(fields[1], 64)
			return kb / 1024
		}
	}
	return 0
}

func memAvailableMiB() float64 {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemAvailable:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

func mean(xs []float64) float64 {
	s := 0.0
	for _, x := range xs {
		s += x
	}
	return s / float64(max(len(xs), 1))
}

// conversion builds a ~0.6 GB image in three layers and times both ways of
// turning it into an ext4 image (seconds).
func conversion(ctx context.Context, dir string) (zw, tar float64, gb float64, err error) {
	var layers []v1.Layer
	var tars [][]byte
	var total int64
	for l := range 3 {
		var entries []ib.Entry
		for f := range 100 {
			data := make([]byte, 2<<20)
			_, _ = rand.Read(data[:4096]) // mostly zeros, some entropy
			entries = append(entries, ib.Entry{Name: fmt.Sprintf("data/l%d/f%03d.bin", l, f), Data: data})
			total += int64(len(data))
		}
		layer, err := ib.Layer(entries...)
		if err != nil {
			return 0, 0, 0, err
		}
		rc, _ := layer.Uncompressed()
		b, _ := io.ReadAll(rc)
		rc.Close()
		layers, tars = append(layers, layer), append(tars, b)
	}
	img, err := ib.Image(ib.Config{Cmd: []string{"/x"}}, layers...)
	if err != nil {
		return 0, 0, 0, err
	}
	gb = float64(total) / 1e9
	dropCaches := func() { syscall.Sync() }
	dropCaches()
	start := time.Now()
	t1 := filepath.Join(dir, "conv-zw")
	_ = os.MkdirAll(t1, 0o755)
	if _, err := rootfs.Flatten(ctx, img, t1, 0); err != nil {
		return 0, 0, 0, err
	}
	if err := rootfs.MakeExt4(ctx, t1, filepath.Join(dir, "zw.ext4"), 64<<20); err != nil {
		return 0, 0, 0, err
	}
	zw = time.Since(start).Seconds()
	dropCaches()
	start = time.Now()
	t2 := filepath.Join(dir, "conv-tar")
	_ = os.MkdirAll(t2, 0o755)
	for _, b := range tars {
		cmd := exec.Command("tar", "-x", "-C", t2)
		cmd.Stdin = bytes.NewReader(b)
		if out, err := cmd.CombinedOutput(); err != nil {
			return 0, 0, 0, fmt.Errorf("tar: %v %s", err, out)
		}
	}
	size := (total*11/10 + 128<<20) / 1024
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", t2, "-O", "^has_journal", filepath.Join(dir, "tar.ext4"), strconv.FormatInt(size, 10)+"k").CombinedOutput(); err != nil {
		return 0, 0, 0, fmt.Errorf("mkfs: %v %s", err, out)
	}
	tar = time.Since(start).Seconds()
	return zw, tar, gb, nil
}
