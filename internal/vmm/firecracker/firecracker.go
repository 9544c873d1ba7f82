// Package firecracker runs microVMs with Firecracker, the production
// backend on hosts with hardware KVM. It spawns one firecracker process
// per VM (through the jailer when configured), in its own session so the
// VM outlives the agent, and drives it over its API socket with a thin
// hand-written client (client.go).
//
// Firecracker cannot run on the development and CI machines, so the
// backend is tested against fctest, a fake that checks every request
// against Firecracker's API description. See docs/adr/0353.
//
// A machine's state directory holds the root disk (a reflink or sparse
// copy of the base ext4 image: Firecracker has no qcow2), the API socket,
// the hybrid vsock socket (the guest agent channel), the pid file, the
// console log and firecracker.json, which Adopt reads.
package firecracker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/zeitwork/zeitwork/internal/guest"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
	"github.com/zeitwork/zeitwork/internal/vmm"
)

// GuestCID is the vsock context id of every guest (each VM has its own
// vsock device, so they need not differ).
const GuestCID = 3

// Config configures the backend.
type Config struct {
	Bin string // firecracker binary; looked up in PATH when not absolute
	// Jailer, when set, starts firecracker through the jailer.
	Jailer *JailerConfig
	// Nice is the niceness of the firecracker processes (vmm.Start).
	Nice int
}

// JailerConfig is the jailer's part of the command line.
type JailerConfig struct {
	Bin           string
	UID, GID      int
	ChrootBaseDir string // default /srv/jailer
}

// Firecracker is the backend.
type Firecracker struct {
	cfg Config
}

var _ vmm.VMM = (*Firecracker)(nil)

// New checks that the binaries exist and returns the backend.
func New(cfg Config) (*Firecracker, error) {
	if cfg.Bin == "" {
		cfg.Bin = "firecracker"
	}
	bin, err := exec.LookPath(cfg.Bin)
	if err != nil {
		return nil, fmt.Errorf("firecracker binary %q not found (FIRECRACKER_BIN): %w", cfg.Bin, err)
	}
	cfg.Bin = bin
	if j := cfg.Jailer; j != nil {
		jc := *j
		if jc.Bin, err = exec.LookPath(jc.Bin); err != nil {
			return nil, fmt.Errorf("jailer binary %q not found (JAILER_BIN): %w", j.Bin, err)
		}
		if jc.ChrootBaseDir == "" {
			jc.ChrootBaseDir = "/srv/jailer"
		}
		cfg.Jailer = &jc
	}
	return &Firecracker{cfg: cfg}, nil
}

// Name is "firecracker".
func (f *Firecracker) Name() string { return "firecracker" }

// Accelerator is always KVM: Firecracker runs nowhere else.
func (f *Firecracker) Accelerator() string { return "kvm" }

// Cmdline is the kernel command line for a boot under Firecracker.
func Cmdline(extra string) string {
	args := []string{"console=ttyS0", "reboot=k", "panic=1", "pci=off", "quiet", "loglevel=1", "nokaslr",
		"i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd", "rdinit=/init", "random.trust_cpu=on"}
	if extra != "" {
		args = append(args, extra)
	}
	return strings.Join(args, " ")
}

// layout is where a machine's files are, as the host and as firecracker
// (possibly chrooted by the jailer) see them. It is saved as
// firecracker.json in the state directory for Adopt.
type layout struct {
	Root     string `json:"root,omitempty"` // jailer chroot; "" without the jailer
	APISock  string `json:"api_sock"`       // as firecracker sees it
	VsockUDS string `json:"vsock_uds"`      // as firecracker sees it
	Disk     string `json:"disk"`           // as firecracker sees it
}

func (l layout) host(p string) string { return l.Root + p }

const stateFile = "firecracker.json"

// unixPathMax is the size of sun_path, terminator included.
const unixPathMax = 108

func (f *Firecracker) layout(id, dir string) (layout, error) {
	var l layout
	if j := f.cfg.Jailer; j != nil {
		l.Root = filepath.Join(j.ChrootBaseDir, filepath.Base(f.cfg.Bin), id, "root")
		l.APISock, l.VsockUDS, l.Disk = "/run/fc.sock", "/v.sock", "/rootfs.ext4"
	} else {
		abs, err := filepath.Abs(dir)
		if err != nil {
			return l, err
		}
		l.APISock, l.VsockUDS, l.Disk = filepath.Join(abs, "fc.sock"), filepath.Join(abs, "v.sock"), filepath.Join(abs, "rootfs.ext4")
	}
	// Guest-initiated vsock connections use "<uds>_<port>".
	for _, p := range []string{l.host(l.APISock), l.host(l.VsockUDS) + "_4294967295"} {
		if len(p) >= unixPathMax {
			return l, fmt.Errorf("socket path %s is longer than %d bytes; use a shorter state directory", p, unixPathMax-1)
		}
	}
	return l, nil
}

// Start copies the root disk, spawns firecracker, configures the VM over
// the API and starts it.
func (f *Firecracker) Start(ctx context.Context, spec vmm.Spec) (vmm.Machine, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	spec = spec.WithDefaults()
	l, err := f.layout(spec.ID, spec.Dir)
	if err != nil {
		return nil, err
	}
	kernel, err := kernelELF(spec.Kernel)
	if err != nil {
		return nil, err
	}
	initrd := spec.Initrd
	if l.Root != "" {
		if err := os.MkdirAll(l.host("/run"), 0o755); err != nil {
			return nil, err
		}
		if kernel, err = f.intoChroot(l, kernel, "/vmlinux"); err != nil {
			return nil, err
		}
		if initrd != "" {
			if initrd, err = f.intoChroot(l, spec.Initrd, "/initrd"); err != nil {
				return nil, err
			}
		}
	}
	if err := copyDisk(ctx, spec.RootDisk, l.host(l.Disk)); err != nil {
		return nil, err
	}
	if j := f.cfg.Jailer; j != nil {
		if err := os.Chown(l.host(l.Disk), j.UID, j.GID); err != nil {
			return nil, fmt.Errorf("cannot hand the root disk to the jailed user: %w", err)
		}
	}
	m, err := f.spawn(ctx, spec.ID, spec.Dir, l)
	if err != nil {
		return nil, err
	}
	calls := []apiCall{
		{"PUT", "/machine-config", machineConfig{VCPUCount: spec.VCPUs, MemSizeMiB: spec.MemoryMiB}},
		{"PUT", "/boot-source", bootSource{KernelImagePath: kernel, InitrdPath: initrd, BootArgs: Cmdline(spec.Cmdline)}},
		{"PUT", "/drives/rootfs", drive{DriveID: "rootfs", PathOnHost: l.Disk}},
	}
	// Extra drives follow the root disk in the order given (vdb, vdc, …).
	for _, d := range spec.Drives {
		p := d.Path
		if l.Root != "" {
			if p, err = f.intoChroot(l, d.Path, "/drive-"+d.ID); err != nil {
				_ = m.Kill()
				return nil, err
			}
			if j := f.cfg.Jailer; j != nil {
				if err := os.Chown(l.host(p), j.UID, j.GID); err != nil {
					_ = m.Kill()
					return nil, fmt.Errorf("cannot hand drive %s to the jailed user: %w", d.ID, err)
				}
			}
		}
		calls = append(calls, apiCall{"PUT", "/drives/" + d.ID, drive{DriveID: d.ID, PathOnHost: p, IsReadOnly: d.ReadOnly}})
	}
	calls = append(calls,
		apiCall{"PUT", "/network-interfaces/eth0", networkInterface{IfaceID: "eth0", HostDevName: spec.Tap, GuestMAC: spec.MAC}},
		apiCall{"PUT", "/vsock", vsock{GuestCID: GuestCID, UDSPath: l.VsockUDS}},
		apiCall{"PUT", "/actions", action{ActionType: "InstanceStart"}},
	)
	err = m.configure(ctx, calls, spec.Tap == "")
	if err != nil {
		_ = m.Kill()
		return nil, err
	}
	return m, nil
}

// kernelELF returns the ELF kernel Firecracker needs: path itself, or,
// when path is a bzImage (what the agent hands every backend), the ELF
// extracted from it and cached beside it.
func kernelELF(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return path, nil // Firecracker names the problem (see APIError)
	}
	hdr := make([]byte, 0x206)
	_, err = io.ReadFull(f, hdr)
	f.Close()
	if err != nil || string(hdr[0x202:]) != "HdrS" {
		return path, nil // not a bzImage: Firecracker judges it
	}
	return guestkernel.EnsureVmlinux(path)
}

type apiCall struct {
	method, path string
	body         any
}

// configure sends the calls in order; without a tap the network
// interface is left out.
func (m *Machine) configure(ctx context.Context, calls []apiCall, noNet bool) error {
	for _, c := range calls {
		if noNet && strings.HasPrefix(c.path, "/network-interfaces/") {
			continue
		}
		if err := m.api.do(ctx, c.method, c.path, c.body, nil); err != nil {
			return fmt.Errorf("cannot configure microVM %s: %w", m.id, err)
		}
	}
	return nil
}

// intoChroot makes a host file visible inside the jail (a hard link, or a
// copy across file systems) and returns its path there.
func (f *Firecracker) intoChroot(l layout, src, name string) (string, error) {
	dst := l.host(name)
	_ = os.Remove(dst)
	if err := os.Link(src, dst); err != nil {
		if err := copyFile(src, dst); err != nil {
			return "", fmt.Errorf("cannot place %s in the jail: %w", src, err)
		}
	}
	return name, nil
}

func copyFile(src, dst string) error {
	out, err := exec.Command("cp", "--reflink=auto", "--sparse=always", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cp %s: %v: %s", src, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// copyDisk gives the VM its own writable copy of the base image: a
// reflink where the file system shares extents (XFS, btrfs), else a
// sparse copy.
func copyDisk(ctx context.Context, base, dst string) error {
	_ = os.Remove(dst)
	out, err := exec.CommandContext(ctx, "cp", "--reflink=auto", "--sparse=always", base, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cannot copy the root disk: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// spawn starts firecracker (or the jailer) in its own session, records
// its pid and layout, and waits for the API socket to answer.
func (f *Firecracker) spawn(ctx context.Context, id, dir string, l layout) (*Machine, error) {
	for _, p := range []string{l.host(l.APISock), l.host(l.VsockUDS)} {
		_ = os.Remove(p)
	}
	args := []string{"--api-sock", l.APISock}
	bin := f.cfg.Bin
	if j := f.cfg.Jailer; j != nil {
		bin = j.Bin
		args = append([]string{"--id", id, "--exec-file", f.cfg.Bin, "--uid", strconv.Itoa(j.UID), "--gid", strconv.Itoa(j.GID),
			"--chroot-base-dir", j.ChrootBaseDir, "--"}, args...)
	}
	logPath := filepath.Join(dir, "console.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	b, _ := json.Marshal(l)
	if err := os.WriteFile(filepath.Join(dir, stateFile), b, 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	// Firecracker writes the guest's serial console and its own log to
	// stdout.
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own session: the VM survives the agent (KillMode=process).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := vmm.Start(cmd, f.cfg.Nice); err != nil {
		return nil, fmt.Errorf("cannot start %s: %w", filepath.Base(bin), err)
	}
	done := make(chan struct{})
	m := &Machine{id: id, pid: cmd.Process.Pid, dir: dir, l: l, done: done, api: newClient(l.host(l.APISock))}
	go func() { _ = cmd.Wait(); close(done) }() // reaps our child
	if err := vmm.WritePID(dir, m.pid); err != nil {
		_ = m.Kill()
		return nil, err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", l.host(l.APISock)); err == nil {
			c.Close()
			return m, nil
		}
		select {
		case <-m.done:
			out, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("firecracker exited at start: %s", tail(out))
		case <-ctx.Done():
			_ = m.Kill()
			return nil, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = m.Kill()
			return nil, errors.New("firecracker did not open its API socket within 10s")
		}
	}
}

// Snapshot names the two files of a Firecracker snapshot.
type Snapshot struct {
	State  string // microVM state (snapshot_path)
	Memory string // guest memory (mem_file_path)
}

// Restore starts a fresh firecracker in dir and loads snap into it,
// resumed. dir must hold the machine's root disk and no vsock socket
// (the snapshot refers to both by path): restore into the directory the
// snapshot was taken in, after the original process has exited.
func (f *Firecracker) Restore(ctx context.Context, id, dir string, snap Snapshot) (*Machine, error) {
	l, err := f.layout(id, dir)
	if err != nil {
		return nil, err
	}
	m, err := f.spawn(ctx, id, dir, l)
	if err != nil {
		return nil, err
	}
	if err := m.LoadSnapshot(ctx, snap, true); err != nil {
		_ = m.Kill()
		return nil, err
	}
	return m, nil
}

// Adopt re-attaches to a firecracker started earlier in dir.
func (f *Firecracker) Adopt(ctx context.Context, dir string) (vmm.Machine, error) {
	var l layout
	if b, err := os.ReadFile(filepath.Join(dir, stateFile)); err != nil || json.Unmarshal(b, &l) != nil {
		return nil, vmm.ErrGone
	}
	// The pid may have been reused: it must still be our firecracker.
	pid, err := vmm.FindProcess(dir, "\x00--api-sock\x00"+l.APISock+"\x00")
	if err != nil {
		return nil, err
	}
	m := &Machine{id: filepath.Base(dir), pid: pid, dir: dir, l: l, api: newClient(l.host(l.APISock))}
	if m.done, err = vmm.Watch(pid, nil); err != nil {
		return nil, err
	}
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var info instanceInfo
	if err := m.api.do(actx, "GET", "/", nil, &info); err != nil {
		select {
		case <-m.done:
			return nil, vmm.ErrGone
		default:
		}
		return nil, fmt.Errorf("cannot adopt firecracker pid %d: %w", pid, err)
	}
	return m, nil
}

// Machine is a running Firecracker microVM.
type Machine struct {
	id   string
	pid  int
	dir  string
	l    layout
	done <-chan struct{}
	api  *client
}

var _ vmm.Machine = (*Machine)(nil)

// ID is the VM id.
func (m *Machine) ID() string { return m.id }

// PID is firecracker's process id.
func (m *Machine) PID() int { return m.pid }

// Done is closed when firecracker has exited.
func (m *Machine) Done() <-chan struct{} { return m.done }

// VsockPath is the hybrid vsock socket on the host: a connection first
// sends "CONNECT <port>\n" (DialVsock does).
func (m *Machine) VsockPath() string { return m.l.host(m.l.VsockUDS) }

// DialAgent connects to zeitwork-init, which listens on guest.VsockPort.
// Each agent start opens a new connection; init switches to the newest.
func (m *Machine) DialAgent(ctx context.Context) (net.Conn, error) {
	return m.DialVsock(ctx, guest.VsockPort)
}

// handshakeTimeout bounds the wait for Firecracker's answer to CONNECT (it
// gives up on a guest that does not answer after 2 s).
const handshakeTimeout = 5 * time.Second

// DialVsock connects to a guest vsock port through the hybrid vsock
// socket: "CONNECT <port>\n", answered "OK <host port>\n" once the guest
// accepted; Firecracker closes the connection when nothing listens there.
func (m *Machine) DialVsock(ctx context.Context, port uint32) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", m.VsockPath())
	if err != nil {
		return nil, fmt.Errorf("cannot connect to the vsock of %s: %w", m.id, err)
	}
	dl := time.Now().Add(handshakeTimeout)
	if cdl, ok := ctx.Deadline(); ok && cdl.Before(dl) {
		dl = cdl
	}
	c.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	br := bufio.NewReader(c)
	var line string
	if _, err = fmt.Fprintf(c, "CONNECT %d\n", port); err == nil {
		line, err = br.ReadString('\n')
	}
	var hostPort uint32
	if err == nil {
		_, err = fmt.Sscanf(line, "OK %d\n", &hostPort)
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("vsock CONNECT %d to %s refused: %q: %w", port, m.id, strings.TrimSpace(line), err)
	}
	if !stop() {
		c.Close()
		return nil, ctx.Err()
	}
	c.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		c.Close()
		return nil, errors.New("vsock peer sent data before the handshake ended")
	}
	return c, nil
}

// Shutdown asks the guest to power off (Ctrl-Alt-Del; the guest kernel
// reboots, which with reboot=k ends firecracker). It does not wait.
func (m *Machine) Shutdown(ctx context.Context) error {
	return m.api.do(ctx, "PUT", "/actions", action{ActionType: "SendCtrlAltDel"}, nil)
}

// Stop shuts the guest down and kills firecracker if it has not exited
// within timeout.
func (m *Machine) Stop(ctx context.Context, timeout time.Duration) error {
	if err := m.Shutdown(ctx); err != nil {
		select {
		case <-m.done:
			return nil
		default:
		}
		return errors.Join(err, m.Kill())
	}
	select {
	case <-m.done:
		return nil
	case <-time.After(timeout):
		return m.Kill()
	case <-ctx.Done():
		return errors.Join(ctx.Err(), m.Kill())
	}
}

// Pause stops the vCPUs.
func (m *Machine) Pause(ctx context.Context) error {
	return m.api.do(ctx, "PATCH", "/vm", vmState{State: "Paused"}, nil)
}

// Resume restarts the vCPUs.
func (m *Machine) Resume(ctx context.Context) error {
	return m.api.do(ctx, "PATCH", "/vm", vmState{State: "Resumed"}, nil)
}

// Snapshot pauses the VM, writes a full snapshot and resumes it (also
// when writing failed).
func (m *Machine) Snapshot(ctx context.Context, snap Snapshot) error {
	if err := m.Pause(ctx); err != nil {
		return fmt.Errorf("cannot pause %s for a snapshot: %w", m.id, err)
	}
	err := m.api.do(ctx, "PUT", "/snapshot/create", snapshotCreate{SnapshotType: "Full", SnapshotPath: m.l.inside(snap.State), MemFilePath: m.l.inside(snap.Memory)}, nil)
	if err != nil {
		err = fmt.Errorf("cannot snapshot %s: %w", m.id, err)
	}
	if rerr := m.Resume(ctx); rerr != nil {
		err = errors.Join(err, fmt.Errorf("cannot resume %s after the snapshot: %w", m.id, rerr))
	}
	return err
}

// LoadSnapshot loads snap into this machine, which must be a fresh
// process (see Restore), and resumes it when resume is set.
func (m *Machine) LoadSnapshot(ctx context.Context, snap Snapshot, resume bool) error {
	_ = os.Remove(m.l.host(m.l.VsockUDS)) // the restored vsock binds it again
	err := m.api.do(ctx, "PUT", "/snapshot/load", snapshotLoad{
		SnapshotPath: m.l.inside(snap.State),
		MemBackend:   memBackend{BackendType: "File", BackendPath: m.l.inside(snap.Memory)},
		ResumeVM:     resume,
	}, nil)
	if err != nil {
		return fmt.Errorf("cannot load snapshot into %s: %w", m.id, err)
	}
	return nil
}

// inside maps a host path to firecracker's view: under the jailer, host
// paths must lie in the chroot.
func (l layout) inside(hostPath string) string {
	if l.Root == "" {
		return hostPath
	}
	if rel, err := filepath.Rel(l.Root, hostPath); err == nil && !strings.HasPrefix(rel, "..") {
		return "/" + rel
	}
	return hostPath
}

// Kill stops firecracker at once.
func (m *Machine) Kill() error {
	defer m.api.close()
	return vmm.Kill(m.pid, m.done, "firecracker")
}

func tail(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 400 {
		s = s[len(s)-400:]
	}
	return s
}
