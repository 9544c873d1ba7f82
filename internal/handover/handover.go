// Package handover upgrades a running service in place without closing its
// listening sockets: on SIGUSR2 the process starts the binary at its own
// path (the new version, once installed there), passes it every listening
// socket as an inherited descriptor, and waits until the new process says
// it serves. Only then does the old process stop accepting and drain; the
// sockets never close, so no connection is refused or reset. A new
// process that exits or stays silent is killed and the old one keeps
// serving.
//
// The protocol between the two processes is two environment variables:
// ZEITWORK_HANDOVER_FDS names the inherited listeners (descriptors 3, 4, …
// in order, comma-separated keys; a key may repeat) and
// ZEITWORK_HANDOVER_READY is the descriptor of a pipe the new process
// writes "ready" to. Under systemd the old process, as the unit's main
// process, hands MAINPID over to the new one before it exits, so
// NotifyAccess=main units keep working.
package handover

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	envFDs   = "ZEITWORK_HANDOVER_FDS"
	envReady = "ZEITWORK_HANDOVER_READY"
	readyMsg = "ready\n"
)

// Handover owns a process's listening sockets across an upgrade.
type Handover struct {
	log  *slog.Logger
	exe  string
	args []string
	// ReadyTimeout bounds how long Upgrade waits for the new process.
	ReadyTimeout time.Duration

	mu        sync.Mutex
	inherited map[string][]*os.File // not yet taken by Listen
	passed    []passed
	gated     []*gatedListener
	stopped   chan struct{} // closed by StopAccepting
	ready     *os.File      // pipe to the previous process; nil when started fresh
	upgrading bool
}

type passed struct {
	key string
	ln  net.Listener
}

// New reads the listeners a previous process passed, if any. The path of
// the running binary is resolved now: once a new version is installed over
// it, /proc/self/exe names a deleted file but the path names the new one.
func New(log *slog.Logger) (*Handover, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("cannot find the running binary: %w", err)
	}
	exe = strings.TrimSuffix(exe, " (deleted)")
	h := &Handover{log: log, exe: exe, args: os.Args[1:], ReadyTimeout: time.Minute, inherited: map[string][]*os.File{}, stopped: make(chan struct{})}
	return h, h.inherit(os.Getenv(envFDs), os.Getenv(envReady))
}

// inherit takes the descriptors named by the two variables and clears
// them, so a process this one starts does not see them.
func (h *Handover) inherit(fds, ready string) error {
	_ = os.Unsetenv(envFDs)
	_ = os.Unsetenv(envReady)
	if fds == "" && ready == "" {
		return nil
	}
	keys, rfd, err := parseEnv(fds, ready)
	if err != nil {
		return err
	}
	for i, k := range keys {
		fd := 3 + i
		syscall.CloseOnExec(fd)
		h.inherited[k] = append(h.inherited[k], os.NewFile(uintptr(fd), k))
	}
	syscall.CloseOnExec(rfd)
	h.ready = os.NewFile(uintptr(rfd), "handover-ready")
	return nil
}

// parseEnv checks the two variables: listener keys for descriptors 3… and
// the ready pipe's descriptor, which follows them.
func parseEnv(fds, ready string) ([]string, int, error) {
	var keys []string
	if fds != "" {
		keys = strings.Split(fds, ",")
	}
	if len(keys) > 1000 {
		return nil, 0, fmt.Errorf("%s: %d listeners, at most 1000", envFDs, len(keys))
	}
	for _, k := range keys {
		if k == "" || strings.ContainsAny(k, "\x00\n") {
			return nil, 0, fmt.Errorf("%s: invalid listener key %q", envFDs, k)
		}
	}
	rfd, err := strconv.Atoi(ready)
	if err != nil || rfd != 3+len(keys) {
		return nil, 0, fmt.Errorf("%s=%q: want descriptor %d, after the %d listeners of %s", envReady, ready, 3+len(keys), len(keys), envFDs)
	}
	return keys, rfd, nil
}

// Inherited reports how many listeners under key the previous process
// passed and Listen has not taken yet.
func (h *Handover) Inherited(key string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.inherited[key])
}

// Listen returns the next listener the previous process passed under key,
// or the one bind creates when there is none left. Either way the listener
// is passed on at the next upgrade. Keys are the configured addresses, so
// a changed address binds afresh.
func (h *Handover) Listen(key string, bind func() (net.Listener, error)) (net.Listener, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var ln net.Listener
	if fs := h.inherited[key]; len(fs) > 0 {
		f := fs[0]
		h.inherited[key] = fs[1:]
		var err error
		ln, err = net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("cannot use the listener %s passed by the previous process: %w", key, err)
		}
	} else {
		var err error
		if ln, err = bind(); err != nil {
			return nil, err
		}
	}
	if _, ok := ln.(syscall.Conn); !ok {
		ln.Close()
		return nil, fmt.Errorf("listener %s (%T) cannot be handed over", key, ln)
	}
	h.passed = append(h.passed, passed{key: key, ln: ln})
	return ln, nil
}

// ListenGated is Listen for a server whose drain closes connections that
// have not sent a request yet (as net/http's Shutdown does): StopAccepting
// closes this process's descriptor of the returned listener, but its
// Accept does not fail until Close. The caller stops accepting, gives the
// connections it already accepted a moment to send their first request,
// then starts the drain.
func (h *Handover) ListenGated(key string, bind func() (net.Listener, error)) (net.Listener, error) {
	ln, err := h.Listen(key, bind)
	if err != nil {
		return nil, err
	}
	g := &gatedListener{Listener: ln, stopped: h.stopped, closed: make(chan struct{})}
	h.mu.Lock()
	h.gated = append(h.gated, g)
	h.mu.Unlock()
	return g, nil
}

// StopAccepting closes this process's descriptors of the listeners from
// ListenGated: new connections go to the next process only. Call it after
// a successful Upgrade.
func (h *Handover) StopAccepting() {
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case <-h.stopped:
		return
	default:
	}
	close(h.stopped)
	for _, g := range h.gated {
		_ = g.Listener.Close()
	}
}

// gatedListener is a listener whose Accept, once the handover stopped it,
// waits for Close instead of failing.
type gatedListener struct {
	net.Listener
	stopped   <-chan struct{}
	closed    chan struct{}
	closeOnce sync.Once
}

func (g *gatedListener) Accept() (net.Conn, error) {
	c, err := g.Listener.Accept()
	if err != nil {
		select {
		case <-g.stopped:
			<-g.closed
			return nil, net.ErrClosed
		default:
		}
	}
	return c, err
}

func (g *gatedListener) Close() error {
	g.closeOnce.Do(func() { close(g.closed) })
	err := g.Listener.Close()
	select {
	case <-g.stopped: // already closed by StopAccepting
		return nil
	default:
		return err
	}
}

// Ready tells the previous process, if any, that this one serves: it stops
// accepting and drains. It also closes inherited listeners no Listen took
// (an address the new configuration dropped).
func (h *Handover) Ready() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for k, fs := range h.inherited {
		for _, f := range fs {
			f.Close()
		}
		delete(h.inherited, k)
	}
	if h.ready == nil {
		return nil
	}
	_, err := io.WriteString(h.ready, readyMsg)
	h.ready.Close()
	h.ready = nil
	if err != nil {
		return fmt.Errorf("cannot tell the previous process this one is ready: %w", err)
	}
	return nil
}

// Upgrade starts the binary at this process's path with its listeners and
// waits until it is ready. It returns the new process's id; the caller
// then stops accepting, drains and exits. On error the new process is gone
// and this one should keep serving.
func (h *Handover) Upgrade(ctx context.Context) (int, error) {
	h.mu.Lock()
	if h.upgrading {
		h.mu.Unlock()
		return 0, errors.New("an upgrade is already running")
	}
	h.upgrading = true
	var (
		fds  []int
		keys []string
		ferr error
	)
	for _, p := range h.passed {
		fd, err := dupCloexec(p.ln.(syscall.Conn))
		if err != nil {
			ferr = fmt.Errorf("cannot pass listener %s: %w", p.key, err)
			break
		}
		fds, keys = append(fds, fd), append(keys, p.key)
	}
	h.mu.Unlock()
	defer func() {
		for _, fd := range fds {
			_ = syscall.Close(fd)
		}
		h.mu.Lock()
		h.upgrading = false
		h.mu.Unlock()
	}()
	if ferr != nil {
		return 0, ferr
	}
	rr, rw, err := os.Pipe()
	if err != nil {
		return 0, fmt.Errorf("cannot create the ready pipe: %w", err)
	}
	defer rr.Close()
	pid, err := h.start(keys, fds, rw)
	rw.Close()
	if err != nil {
		return 0, fmt.Errorf("cannot start %s: %w", h.exe, err)
	}
	proc, err := os.FindProcess(pid)
	if err != nil { // not on Linux: the process exists until it is waited for
		return 0, err
	}
	h.log.Info("upgrade: new process started", "pid", pid, "binary", h.exe)

	got := make(chan error, 1)
	go func() { // ends when the pipe says ready or closes: the child wrote, exited, or was killed below
		buf := make([]byte, len(readyMsg))
		_, err := io.ReadFull(rr, buf)
		if err == nil && string(buf) != readyMsg {
			err = fmt.Errorf("unexpected message %q", buf)
		}
		got <- err
	}()
	timer := time.NewTimer(h.ReadyTimeout)
	defer timer.Stop()
	var fail error
	select {
	case err := <-got:
		got <- err // for the wait below
		if err == nil {
			_ = proc.Release()
			if err := sdNotify(fmt.Sprintf("MAINPID=%d", pid)); err != nil {
				h.log.Warn("upgrade: cannot hand the main process over to systemd", "err", err)
			}
			return pid, nil
		}
		fail = fmt.Errorf("new process %d ended before it was ready: %w", pid, err)
	case <-timer.C:
		fail = fmt.Errorf("new process %d not ready within %s", pid, h.ReadyTimeout)
	case <-ctx.Done():
		fail = fmt.Errorf("upgrade to process %d abandoned: %w", pid, ctx.Err())
	}
	_ = proc.Kill()
	state, werr := proc.Wait()
	<-got
	if werr != nil {
		return 0, fmt.Errorf("%w (%v)", fail, werr)
	}
	return 0, fmt.Errorf("%w (%v)", fail, state)
}

// start forks and executes the binary with the listeners as descriptors
// 3… and the ready pipe after them. It passes raw descriptors:
// os/exec's ExtraFiles would switch the shared sockets to blocking mode
// (os.File.Fd), under this process's own accept loops.
func (h *Handover) start(keys []string, fds []int, ready *os.File) (int, error) {
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return 0, err
	}
	defer devnull.Close()
	var in, rfd int
	for _, c := range []struct {
		f  *os.File
		fd *int
	}{{devnull, &in}, {ready, &rfd}} {
		rc, err := c.f.SyscallConn()
		if err != nil {
			return 0, err
		}
		if err := rc.Control(func(fd uintptr) { *c.fd = int(fd) }); err != nil {
			return 0, err
		}
	}
	files := []uintptr{uintptr(in), 1, 2}
	for _, fd := range fds {
		files = append(files, uintptr(fd))
	}
	files = append(files, uintptr(rfd))
	env := append(withoutHandoverEnv(os.Environ()), envFDs+"="+strings.Join(keys, ","), envReady+"="+strconv.Itoa(3+len(fds)))
	return syscall.ForkExec(h.exe, append([]string{h.exe}, h.args...), &syscall.ProcAttr{Env: env, Files: files})
}

// dupCloexec duplicates a socket's descriptor (close-on-exec, so no other
// process started meanwhile inherits it).
func dupCloexec(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, os.NewSyscallError("fcntl", derr)
	}
	return nfd, nil
}

// Run upgrades on every SIGUSR2 until ctx ends or an upgrade succeeds;
// then it calls upgraded, which makes the caller drain and exit. A failed
// upgrade is logged and the process keeps serving.
func (h *Handover) Run(ctx context.Context, upgraded func()) error {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR2)
	defer signal.Stop(sig)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sig:
		}
		pid, err := h.Upgrade(ctx)
		if err != nil {
			h.log.Error("upgrade failed; still serving", "err", err)
			continue
		}
		h.log.Info("upgrade: new process ready; draining", "pid", pid)
		upgraded()
		return nil
	}
}

func withoutHandoverEnv(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, envFDs+"=") && !strings.HasPrefix(kv, envReady+"=") {
			out = append(out, kv)
		}
	}
	return out
}

// sdNotify sends one state line to systemd; nothing without NOTIFY_SOCKET.
func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err
}
