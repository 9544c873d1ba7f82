// Command zeitwork-init is PID 1 inside every Zeitwork microVM. It runs from
// the initramfs: loads the virtio drivers, mounts the root disk, configures
// networking, receives the app's run configuration over the agent channel,
// runs the app chrooted into the root disk as the image's user, streams its
// output to the host line by line, reaps zombies, forwards a stop request
// as SIGTERM (SIGKILL after a grace period), reports the exit code and
// powers the VM off.
//
// Built static (CGO_ENABLED=0).
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/buildinfo"
	"github.com/zeitwork/zeitwork/internal/buildrunner"
	"github.com/zeitwork/zeitwork/internal/guest"
)

// modules are loaded in this order from /lib/modules in the initramfs
// (missing ones are skipped: a kernel may have them built in).
var modules = []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net", "virtio_console", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport", "overlay"}

const newRoot = "/newroot"

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "--version" || os.Args[1] == "version") {
		fmt.Println(buildinfo.String("zeitwork-init"))
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "build" {
		// A builder VM's workload (internal/buildrunner), started by
		// this same binary as PID 1.
		os.Exit(buildrunner.Main())
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "zeitwork-init: must run as PID 1 inside a microVM")
		os.Exit(2)
	}
	code := run()
	logf("powering off (app exit code %d)", code)
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "zeitwork-init: "+format+"\n", args...)
}

func run() int {
	if err := earlyMounts(); err != nil {
		logf("mounts: %v", err)
		return 120
	}
	for _, m := range modules {
		if err := loadModule("/lib/modules/" + m + ".ko"); err != nil {
			logf("module %s: %v", m, err)
		}
	}
	ch, err := openAgentChannel(20 * time.Second)
	if err != nil {
		logf("agent channel: %v", err)
		return 121
	}
	// Log lines go through a bounded queue: while the host side is away
	// (agent restart) sends block, and the app must not.
	logs := make(chan *guest.Frame, 4096)
	drained := make(chan struct{})
	go func() { // ends when logs is closed
		defer close(drained)
		for f := range logs {
			_ = ch.Send(f)
		}
	}()
	flush := func() {
		close(logs)
		select {
		case <-drained:
		case <-time.After(2 * time.Second):
		}
	}
	send := func(stream, line string) {
		select {
		case logs <- &guest.Frame{Type: guest.TypeLog, Stream: stream, Line: line}:
		default: // queue full: drop rather than stall the app
		}
	}
	fail := func(code int, format string, args ...any) int {
		msg := fmt.Sprintf(format, args...)
		logf("%s", msg)
		send("init", msg)
		flush()
		_ = ch.Send(&guest.Frame{Type: guest.TypeExit, Code: &code, Error: msg})
		return code
	}
	// Every host connection is greeted with ready until one sends the
	// config (under vsock an agent may go away in between).
	ch.Greet(&guest.Frame{Type: guest.TypeReady})
	var cfg *guest.Config
	for cfg == nil {
		f, err := ch.Next()
		if err != nil {
			return fail(122, "reading config: %v", err)
		}
		if f.Type == guest.TypeConfig {
			cfg = f.Config
		}
	}
	ch.Greet(nil)
	if err := mountRoot(); err != nil {
		return fail(123, "root disk: %v", err)
	}
	if err := setupNetwork(cfg); err != nil {
		return fail(124, "network: %v", err)
	}
	if err := writeEtc(cfg); err != nil {
		send("init", "cannot write /etc files: "+err.Error())
	}
	return supervise(cfg, ch, send, flush)
}

func earlyMounts() error {
	for _, m := range []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
	} {
		_ = os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fs, 0, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	return nil
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil
		}
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && err != unix.EEXIST {
		return err
	}
	return nil
}

func mountRoot() error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat("/dev/vda"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("/dev/vda did not appear")
		}
		time.Sleep(5 * time.Millisecond)
	}
	_ = os.MkdirAll(newRoot, 0o755)
	if err := unix.Mount("/dev/vda", newRoot, "ext4", unix.MS_NOATIME, ""); err != nil {
		return fmt.Errorf("mount /dev/vda: %w", err)
	}
	for _, m := range []struct {
		src, dst, fs string
		flags        uintptr
		data         string
	}{
		{"proc", "/proc", "proc", 0, ""},
		{"sysfs", "/sys", "sysfs", 0, ""},
		{"devtmpfs", "/dev", "devtmpfs", 0, ""},
		{"devpts", "/dev/pts", "devpts", 0, "newinstance,ptmxmode=0666"},
		{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	} {
		dst := newRoot + m.dst
		_ = os.MkdirAll(dst, 0o755)
		if err := unix.Mount(m.src, dst, m.fs, m.flags, m.data); err != nil {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	return nil
}

func setupNetwork(cfg *guest.Config) error {
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		_ = netlink.LinkSetUp(lo)
	}
	if cfg.Hostname != "" {
		_ = unix.Sethostname([]byte(cfg.Hostname))
	}
	if cfg.Address == "" {
		return nil
	}
	var eth netlink.Link
	deadline := time.Now().Add(10 * time.Second)
	for {
		if eth, err = netlink.LinkByName("eth0"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("eth0 did not appear: %w", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if cfg.MTU > 0 {
		_ = netlink.LinkSetMTU(eth, cfg.MTU)
	}
	addr, err := netlink.ParseAddr(cfg.Address)
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(eth, addr); err != nil {
		return fmt.Errorf("address %s: %w", cfg.Address, err)
	}
	if err := netlink.LinkSetUp(eth); err != nil {
		return err
	}
	if cfg.Gateway != "" {
		gw := net.ParseIP(cfg.Gateway)
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: gw}); err != nil {
			return fmt.Errorf("default route via %s: %w", cfg.Gateway, err)
		}
	}
	return nil
}

func writeEtc(cfg *guest.Config) error {
	_ = os.MkdirAll(newRoot+"/etc", 0o755)
	var errs []error
	if len(cfg.DNS) > 0 {
		var b strings.Builder
		for _, d := range cfg.DNS {
			fmt.Fprintf(&b, "nameserver %s\n", d)
		}
		errs = append(errs, replaceFile(newRoot+"/etc/resolv.conf", b.String()))
	}
	hosts := "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
	if cfg.Hostname != "" {
		if ip, _, ok := strings.Cut(cfg.Address, "/"); ok {
			hosts += ip + "\t" + cfg.Hostname + "\n"
		}
		errs = append(errs, replaceFile(newRoot+"/etc/hostname", cfg.Hostname+"\n"))
	}
	for name, ip := range cfg.Hosts {
		hosts += ip + "\t" + name + "\n"
	}
	errs = append(errs, replaceFile(newRoot+"/etc/hosts", hosts))
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

// replaceFile writes content, replacing a symlink (images often link
// /etc/resolv.conf elsewhere) rather than following it.
func replaceFile(path, content string) error {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		_ = os.Remove(path)
	}
	return os.WriteFile(path, []byte(content), 0o644)
}

// supervise runs the app, forwards its output, handles stop frames, reaps
// every child, and returns the app's exit code.
func supervise(cfg *guest.Config, ch *guest.Channel, send func(stream, line string), flush func()) int {
	argv := cfg.Argv()
	path := argv[0]
	if !strings.Contains(path, "/") {
		path = lookPathIn(newRoot, path, cfg.Env)
	}
	cmd := exec.Command(path, argv[1:]...)
	cmd.Env = cfg.Env
	cmd.Dir = cfg.WorkDir
	if cmd.Dir == "" {
		cmd.Dir = "/"
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Chroot:     newRoot,
		Setsid:     true,
		Credential: &syscall.Credential{Uid: cfg.UID, Gid: cfg.GID, Groups: cfg.Groups},
	}
	stdout, _ := cmd.StdoutPipe()
	stderr, _ := cmd.StderrPipe()
	// Chroot happens before chdir in the child, so Dir is inside the root.
	if err := cmd.Start(); err != nil {
		code := 127
		msg := fmt.Sprintf("cannot start %s: %v", strings.Join(argv, " "), err)
		send("init", msg)
		flush()
		_ = ch.Send(&guest.Frame{Type: guest.TypeExit, Code: &code, Error: msg})
		return code
	}
	var out sync.WaitGroup
	for stream, rd := range map[string]io.Reader{"stdout": stdout, "stderr": stderr} {
		out.Go(func() {
			sc := bufio.NewScanner(rd)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				send(stream, sc.Text())
			}
		})
	}
	grace := time.Duration(cfg.StopGraceMS) * time.Millisecond
	if grace <= 0 {
		grace = 10 * time.Second
	}
	go func() { // ends at power-off
		for {
			// A host that goes away and comes back (agent restart) is
			// the channel's business: Next goes on with the newest
			// connection. Malformed frames are skipped.
			f, err := ch.Next()
			if errors.Is(err, guest.ErrClosed) {
				return
			}
			if err == nil && f.Type == guest.TypeStop {
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
				time.AfterFunc(grace, func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
			}
		}
	}()
	// Reap every child; the app's status decides the exit code.
	code := 0
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			break
		}
		if pid == cmd.Process.Pid {
			switch {
			case ws.Exited():
				code = ws.ExitStatus()
			case ws.Signaled():
				code = 128 + int(ws.Signal())
			}
			break
		}
	}
	out.Wait()
	flush()
	_ = ch.Send(&guest.Frame{Type: guest.TypeExit, Code: &code})
	return code
}

// lookPathIn resolves a bare command name against PATH inside root.
func lookPathIn(root, name string, env []string) string {
	path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range strings.Split(path, ":") {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(filepath.Join(root, p)); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	return name
}
