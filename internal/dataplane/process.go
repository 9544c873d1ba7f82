package dataplane

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/buildinfo"
	"github.com/zeitwork/zeitwork/internal/fsutil"
	"github.com/zeitwork/zeitwork/internal/service"
)

// Paths are a node's data-plane files under VM_WORK_DIR.
type Paths struct {
	Dir         string // VM_WORK_DIR/dataplane
	Table       string // the routing table (written by the agent)
	PID         string // the running data plane's pid
	Control     string // the data plane's control socket (GET /ping)
	Log         string // the data plane's stdout and stderr
	AgentSocket string // the agent's API socket (VM_WORK_DIR/agent.sock)
}

// PathsFor returns the data-plane files of the node whose work directory
// is workDir.
func PathsFor(workDir string) Paths {
	d := filepath.Join(workDir, "dataplane")
	return Paths{Dir: d, Table: filepath.Join(d, "table.json"), PID: filepath.Join(d, "dataplane.pid"),
		Control: filepath.Join(d, "control.sock"), Log: filepath.Join(d, "dataplane.log"),
		AgentSocket: filepath.Join(workDir, "agent.sock")}
}

// Version identifies this build; an agent replaces a data plane that
// reports another one.
func Version() string { return buildinfo.Version + "+" + buildinfo.CommitOrUnknown() }

// Args are the command-line arguments that run the data plane
// (`zeitwork-node-agent dataplane serve`); they also identify its process.
var Args = []string{"dataplane", "serve"}

// listenerEnv names the inherited listening socket's descriptor.
const listenerEnv = "ZEITWORK_DATAPLANE_LISTENER"

// Info is what a running data plane answers on its control socket.
type Info struct {
	PID     int    `json:"pid"`
	Version string `json:"version"`
	Addr    string `json:"addr"`
}

// Ping asks the data plane behind the control socket who it is.
func Ping(ctx context.Context, control string) (Info, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", control)
		}}}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://dataplane/ping", nil)
	resp, err := c.Do(req)
	if err != nil {
		return Info{}, fmt.Errorf("cannot ping the data plane: %w", err)
	}
	defer resp.Body.Close()
	var in Info
	if err := json.NewDecoder(resp.Body).Decode(&in); err != nil || resp.StatusCode != 200 || in.PID <= 0 {
		return Info{}, fmt.Errorf("data plane ping: status %d: %v", resp.StatusCode, err)
	}
	return in, nil
}

// ProcessConfig configures the data plane process.
type ProcessConfig struct {
	WorkDir string
	Addr    string // where to listen when no listener is inherited (PORT)
	Token   string
	Drain   time.Duration // graceful shutdown bound; default 15s
}

// Serve is the data plane process (`zeitwork-node-agent dataplane serve`):
// it serves the listener inherited from the agent (or listens on Addr),
// answers on its control socket, follows the routing table, and drains on
// SIGTERM (ctx).
func Serve(ctx context.Context, cfg ProcessConfig, log *slog.Logger) error {
	if cfg.Drain <= 0 {
		cfg.Drain = 15 * time.Second
	}
	p := PathsFor(cfg.WorkDir)
	if err := os.MkdirAll(p.Dir, 0o755); err != nil {
		return fmt.Errorf("cannot create %s: %w", p.Dir, err)
	}
	ln, err := inheritedListener()
	if err != nil {
		return err
	}
	if ln == nil {
		if ln, err = Listen(ctx, cfg.Addr); err != nil {
			return err
		}
	}
	defer ln.Close()
	// The control socket: a replacement takes the path over while this
	// process drains, so this one never unlinks it.
	_ = os.Remove(p.Control)
	ctl, err := net.Listen("unix", p.Control)
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %w", p.Control, err)
	}
	ctl.(*net.UnixListener).SetUnlinkOnClose(false)
	defer ctl.Close()
	if err := fsutil.WriteFile(p.PID, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return fmt.Errorf("cannot write the pid file: %w", err)
	}
	addr := ln.Addr().String()
	s := New(Config{Token: cfg.Token, TablePath: p.Table, AgentSocket: p.AgentSocket,
		Info: map[string]any{"pid": os.Getpid(), "version": Version(), "addr": addr}}, log)
	if cfg.Addr != "" {
		s.cfg.Info["addr"] = cfg.Addr
	}
	if err := s.Reload(); err != nil {
		log.Warn("routing table not loaded", "err", err)
	}
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
	csrv := &http.Server{Handler: s.ControlHandler(), ReadHeaderTimeout: 5 * time.Second}
	log.Info("data plane serving", "addr", addr, "pid", os.Getpid(), "version", Version())
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.Run(gctx) })
	g.Go(func() error { return service.Serve(gctx, srv, ln, cfg.Drain) })
	g.Go(func() error { return service.Serve(gctx, csrv, ctl, time.Second) })
	return g.Wait()
}

// inheritedListener returns the listening socket the agent passed, or nil.
func inheritedListener() (net.Listener, error) {
	v := os.Getenv(listenerEnv)
	if v == "" {
		return nil, nil
	}
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q is not a descriptor", listenerEnv, v)
	}
	f := os.NewFile(uintptr(fd), "dataplane-listener")
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("cannot use the inherited listener: %w", err)
	}
	return ln, nil
}

// Listen opens the node's public listener with SO_REUSEPORT, so a new data
// plane can bind the port while the one it replaces drains.
func Listen(ctx context.Context, addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cannot listen on %s: %w", addr, err)
	}
	return ln, nil
}

// Spawn describes how an agent starts its node's data plane.
type Spawn struct {
	WorkDir string
	Addr    string   // the node's public address (PORT)
	Exe     string   // default: this executable
	Env     []string // default: this process's environment
	Log     *slog.Logger
	Timeout time.Duration // until the new process answers; default 10s
}

// Ensure makes sure a data plane of this build serves Addr for WorkDir and
// returns its pid and whether it started one. A running one of the same
// version is kept; one of another version (or address) is replaced without
// closing the port: the new process binds it too (SO_REUSEPORT), and the
// old one drains once the new one answers. A data plane that is alive but
// does not answer is killed when replaceHung is set, else left alone.
func Ensure(ctx context.Context, sp Spawn, replaceHung bool) (int, bool, error) {
	p := PathsFor(sp.WorkDir)
	if sp.Log == nil {
		sp.Log = slog.New(slog.DiscardHandler)
	}
	old := 0
	if in, err := Ping(ctx, p.Control); err == nil {
		if in.Version == Version() && in.Addr == sp.Addr {
			return in.PID, false, nil
		}
		sp.Log.Info("replacing the data plane", "pid", in.PID, "version", in.Version, "addr", in.Addr, "new_version", Version(), "new_addr", sp.Addr)
		old = in.PID
	} else if pid := RunningPID(sp.WorkDir); pid > 0 {
		if !replaceHung {
			sp.Log.Warn("the data plane does not answer; leaving it", "pid", pid, "err", err)
			return pid, false, nil
		}
		sp.Log.Warn("killing a data plane that does not answer", "pid", pid, "err", err)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		waitGone(pid, 5*time.Second)
	}
	pid, err := spawn(ctx, sp, p)
	if err != nil {
		return 0, false, err
	}
	if old > 0 {
		_ = syscall.Kill(old, syscall.SIGTERM) // drains, then exits
	}
	return pid, true, nil
}

func spawn(ctx context.Context, sp Spawn, p Paths) (int, error) {
	if sp.Timeout <= 0 {
		sp.Timeout = 10 * time.Second
	}
	exe := sp.Exe
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return 0, fmt.Errorf("cannot find this executable: %w", err)
		}
	}
	env := sp.Env
	if env == nil {
		env = os.Environ()
	}
	if err := os.MkdirAll(p.Dir, 0o755); err != nil {
		return 0, fmt.Errorf("cannot create %s: %w", p.Dir, err)
	}
	ln, err := Listen(ctx, sp.Addr)
	if err != nil {
		return 0, err // a port held by someone else surfaces here, in the agent
	}
	f, err := ln.(*net.TCPListener).File()
	ln.Close()
	if err != nil {
		return 0, fmt.Errorf("cannot pass the listener on: %w", err)
	}
	defer f.Close()
	logf, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return 0, fmt.Errorf("cannot open the data plane log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(exe, Args...)
	cmd.Env = append(env[:len(env):len(env)], listenerEnv+"=3")
	cmd.Dir = "/"
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session and no parent-death signal: it outlives the agent,
	// like the VMs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("cannot start the data plane: %w", err)
	}
	pid := cmd.Process.Pid
	_ = cmd.Process.Release() // reaped by Reap
	deadline := time.Now().Add(sp.Timeout)
	for {
		if in, err := Ping(ctx, p.Control); err == nil && in.PID == pid {
			sp.Log.Info("data plane started", "pid", pid, "addr", sp.Addr, "version", Version())
			return pid, nil
		}
		exited := Reap(pid)
		if !exited && ctx.Err() != nil {
			// The agent is stopping while its new data plane comes up:
			// leave it serving, as it outlives the agent anyway.
			sp.Log.Info("data plane started; the agent is stopping", "pid", pid, "addr", sp.Addr)
			return pid, nil
		}
		if exited || time.Now().After(deadline) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			Reap(pid)
			return 0, fmt.Errorf("the data plane did not come up; its log ends:\n%s", tail(p.Log, 10))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Reap collects pid if it is an exited child of this process and reports
// whether it has exited.
func Reap(pid int) bool {
	var ws syscall.WaitStatus
	got, err := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
	return got == pid || errors.Is(err, syscall.ECHILD) && syscall.Kill(pid, 0) != nil
}

// RunningPID returns the pid of the work directory's data plane process if
// one is alive (by its pid file and command line), else 0.
func RunningPID(workDir string) int {
	b, err := os.ReadFile(PathsFor(workDir).PID)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return 0
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cmdline, []byte("\x00"+strings.Join(Args, "\x00")+"\x00")) {
		return 0
	}
	// A data plane that started after the pid file was written is another
	// one that got a recycled pid (pid_max may be as low as 32768), not
	// this directory's.
	if fi, err := os.Stat(PathsFor(workDir).PID); err == nil {
		if started, ok := processStart(pid); ok && started.After(fi.ModTime().Add(2*time.Second)) {
			return 0
		}
	}
	return pid
}

// processStart is when pid started, from /proc/<pid>/stat (field 22,
// clock ticks after boot) and the boot time in /proc/stat.
func processStart(pid int) (time.Time, bool) {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return time.Time{}, false
	}
	i := bytes.LastIndexByte(st, ')')
	if i < 0 {
		return time.Time{}, false
	}
	f := strings.Fields(string(st[i+1:]))
	if len(f) < 20 { // state is field 3, starttime field 22
		return time.Time{}, false
	}
	ticks, err := strconv.ParseInt(f[19], 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			boot, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return time.Time{}, false
			}
			const hz = 100 // USER_HZ on Linux
			return time.Unix(boot, 0).Add(time.Duration(ticks) * time.Second / hz), true
		}
	}
	return time.Time{}, false
}

// Stop stops the work directory's data plane: SIGTERM (it drains), then
// SIGKILL after grace. Stopping none is not an error.
func Stop(workDir string, grace time.Duration) error {
	pid := RunningPID(workDir)
	if pid == 0 {
		return nil
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	if waitGone(pid, grace) {
		return nil
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if !waitGone(pid, 5*time.Second) {
		return fmt.Errorf("data plane %d did not exit", pid)
	}
	return nil
}

// waitGone waits until pid is gone (or a zombie) and reports whether it is.
func waitGone(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		Reap(pid)
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || zombie(st) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// zombie reports whether a /proc/<pid>/stat line is a zombie's.
func zombie(stat []byte) bool { return procState(stat) == 'Z' }

// procState is the state letter of a /proc/<pid>[/task/<tid>]/stat line
// (after the parenthesised command, which may hold anything), or 0.
func procState(stat []byte) byte {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 || len(stat) <= i+2 {
		return 0
	}
	return stat[i+2]
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Keep checks on the data plane every interval until ctx ends and starts a
// new one if it died; pid is the one the agent's first Ensure returned.
// It never stops the data plane: that outlives the agent.
func Keep(ctx context.Context, sp Spawn, pid int, every time.Duration) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		Reap(pid) // when it was this agent's child and exited
		got, started, err := Ensure(ctx, sp, false)
		switch {
		case err != nil && ctx.Err() == nil:
			sp.Log.Error("cannot restart the data plane", "err", err)
		case started:
			sp.Log.Warn("the data plane had died; started a new one", "old_pid", pid, "pid", got)
			pid = got
		}
	}
}
