// Package qemu runs microVMs with QEMU's microvm machine (virtio-mmio
// devices, as Firecracker), with KVM where the host supports hardware
// virtualisation and software emulation (TCG) where it does not.
package qemu

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/zeitwork/zeitwork/internal/vmm"
)

// Accel names the accelerator in use.
type Accel string

// Accelerators.
const (
	KVM Accel = "kvm"
	TCG Accel = "tcg"
)

// DetectAccel returns KVM only when /dev/kvm is usable with hardware
// virtualisation (kvm_intel or kvm_amd loaded, not KVM-PVM, whose guests
// must be special kernels and which hangs stock ones instead of failing).
func DetectAccel() Accel {
	if os.Getenv("ZEITWORK_QEMU_ACCEL") == "tcg" {
		return TCG
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return TCG
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return TCG
	}
	for _, m := range []string{"/sys/module/kvm_intel", "/sys/module/kvm_amd"} {
		if _, err := os.Stat(m); err == nil {
			return KVM
		}
	}
	return TCG
}

// QEMU is the backend.
type QEMU struct {
	Bin    string // qemu-system-x86_64
	ImgBin string // qemu-img
	Accel  Accel
	Nice   int // niceness of the QEMU processes (vmm.Start)
	cpuKHz int
}

var _ vmm.VMM = (*QEMU)(nil)

// New returns the backend, detecting the accelerator.
func New() (*QEMU, error) {
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("qemu-system-x86_64 not found (Debian package qemu-system-x86): %w", err)
	}
	img, err := exec.LookPath("qemu-img")
	if err != nil {
		return nil, fmt.Errorf("qemu-img not found (Debian package qemu-utils): %w", err)
	}
	return &QEMU{Bin: bin, ImgBin: img, Accel: DetectAccel(), Nice: vmm.DefaultNice, cpuKHz: hostCPUKHz()}, nil
}

// Name is "qemu".
func (q *QEMU) Name() string { return "qemu" }

// hostCPUKHz reads the host CPU frequency; the guest needs it under TCG
// (tsc_early_khz) because microvm has no timer to calibrate against.
func hostCPUKHz() int {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 2000000
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			if mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
				return int(mhz * 1000)
			}
		}
	}
	return 2000000
}

// Cmdline is the kernel command line for a boot under this backend.
func (q *QEMU) Cmdline(extra string) string {
	args := []string{"console=ttyS0", "quiet", "loglevel=1", "panic=-1", "reboot=t", "nokaslr",
		"mitigations=off", "cryptomgr.notests", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
		"rdinit=/init", "random.trust_cpu=on"}
	if q.Accel == TCG {
		args = append(args, fmt.Sprintf("tsc_early_khz=%d", q.cpuKHz), "tsc=reliable")
	}
	if extra != "" {
		args = append(args, extra)
	}
	return strings.Join(args, " ")
}

// Start boots spec. spec.Kernel may be a bzImage or an ELF vmlinux with a
// PVH entry note (QEMU's -kernel loads either).
func (q *QEMU) Start(ctx context.Context, spec vmm.Spec) (vmm.Machine, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	spec = spec.WithDefaults()
	overlay := filepath.Join(spec.Dir, "disk.qcow2")
	_ = os.Remove(overlay)
	if out, err := exec.CommandContext(ctx, q.ImgBin, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", spec.RootDisk, overlay).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("cannot create overlay disk: %v: %s", err, out)
	}
	sock, err := socketPath(spec.Dir)
	if err != nil {
		return nil, err
	}
	_ = os.Remove(sock)
	accel := "tcg,tb-size=32"
	cpu := []string{}
	if q.Accel == KVM {
		accel = "kvm"
		cpu = []string{"-cpu", "host"}
	}
	args := []string{
		"-name", "zeitwork-" + spec.ID,
		"-M", "microvm,x-option-roms=off,pit=off,pic=off,rtc=on",
		"-accel", accel,
	}
	args = append(args, cpu...)
	args = append(args,
		"-smp", strconv.Itoa(spec.VCPUs), "-m", strconv.Itoa(spec.MemoryMiB),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-serial", "file:"+filepath.Join(spec.Dir, "console.log"),
		"-kernel", spec.Kernel, "-initrd", spec.Initrd, "-append", q.Cmdline(spec.Cmdline),
		"-drive", "id=root,file="+overlay+",format=qcow2,if=none,cache=unsafe",
		"-device", "virtio-blk-device,drive=root",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path="+sock+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=zw.agent",
		"-pidfile", filepath.Join(spec.Dir, "qemu.pid"),
	)
	for i, d := range spec.Drives {
		opt := fmt.Sprintf("id=d%d,file=%s,format=raw,if=none,cache=unsafe,discard=unmap", i, d.Path)
		if d.ReadOnly {
			opt += ",readonly=on"
		}
		args = append(args, "-drive", opt, "-device", fmt.Sprintf("virtio-blk-device,drive=d%d,serial=%s", i, d.ID))
	}
	if spec.Tap != "" {
		args = append(args, "-netdev", "tap,id=n0,ifname="+spec.Tap+",script=no,downscript=no",
			"-device", "virtio-net-device,netdev=n0,mac="+spec.MAC)
	}
	logf, err := os.OpenFile(filepath.Join(spec.Dir, "qemu.log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(q.Bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own session: the VM survives the agent (KillMode=process).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := vmm.Start(cmd, q.Nice); err != nil {
		return nil, fmt.Errorf("cannot start qemu: %w", err)
	}
	done := make(chan struct{})
	m := &machine{id: spec.ID, pid: cmd.Process.Pid, dir: spec.Dir, done: done}
	if err := vmm.WritePID(spec.Dir, m.pid); err != nil {
		_ = cmd.Process.Kill()
		return nil, err
	}
	go func() { // reaps our child
		_ = cmd.Wait()
		_ = os.Remove(sock) // QEMU leaves it behind when killed
		close(done)
	}()
	// The agent socket exists once QEMU has set up its devices.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return m, nil
		}
		select {
		case <-m.done:
			b, _ := os.ReadFile(filepath.Join(spec.Dir, "qemu.log"))
			return nil, fmt.Errorf("qemu exited at start: %s", strings.TrimSpace(string(b)))
		case <-ctx.Done():
			_ = m.Kill()
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = m.Kill()
			return nil, errors.New("qemu did not create its agent socket within 30s")
		}
	}
}

// Adopt re-attaches to a QEMU started earlier in dir.
func (q *QEMU) Adopt(ctx context.Context, dir string) (vmm.Machine, error) {
	sock, err := socketPath(dir)
	if err != nil {
		return nil, err
	}
	pid, err := vmm.FindProcess(dir, sock)
	if err != nil {
		return nil, err
	}
	m := &machine{id: filepath.Base(dir), pid: pid, dir: dir}
	if m.done, err = vmm.Watch(pid, func() { _ = os.Remove(sock) }); err != nil {
		return nil, err
	}
	return m, nil
}

type machine struct {
	id   string
	pid  int
	dir  string
	done <-chan struct{}
}

func (m *machine) ID() string { return m.id }
func (m *machine) PID() int   { return m.pid }

// DialAgent connects to the chardev socket behind the guest's virtio-serial
// port guest.PortName. A node agent that restarts connects again; init
// keeps its end of the port.
func (m *machine) DialAgent(ctx context.Context) (net.Conn, error) {
	sock, err := socketPath(m.dir)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	return d.DialContext(ctx, "unix", sock)
}

// socketDir holds agent sockets: Unix socket paths are limited to 108
// bytes, which a state directory deep in VM_WORK_DIR can exceed, so the
// socket gets a short name derived from the state directory.
const socketDir = "/run/zeitwork-vm"

func socketPath(stateDir string) (string, error) {
	if err := os.MkdirAll(socketDir, 0o700); err != nil {
		return "", fmt.Errorf("cannot create %s: %w", socketDir, err)
	}
	abs, _ := filepath.Abs(stateDir)
	h := sha256.Sum256([]byte(abs))
	return filepath.Join(socketDir, hex.EncodeToString(h[:10])+".sock"), nil
}
func (m *machine) Done() <-chan struct{} { return m.done }

func (m *machine) Kill() error { return vmm.Kill(m.pid, m.done, "qemu") }
