package nodeagent

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
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/zeitwork/zeitwork/internal/fsutil"
	"github.com/zeitwork/zeitwork/internal/guest"
	"github.com/zeitwork/zeitwork/internal/hostnet"
	"github.com/zeitwork/zeitwork/internal/rootfs"
	"github.com/zeitwork/zeitwork/internal/vmm"
)

// Instance states.
const (
	StatePending   = "pending"
	StatePreparing = "preparing"
	StateStarting  = "starting"
	StateRunning   = "running"
	StateStopping  = "stopping"
	StateStopped   = "stopped"
	StateFailed    = "failed"
)

// Spec is what the operator asks for (POST /instances).
type Spec struct {
	ID           string            `json:"id"`
	DeploymentID string            `json:"deployment_id"`
	Image        string            `json:"image"`
	Port         int               `json:"port"`
	VCPUs        int               `json:"vcpus"`
	MemoryMiB    int               `json:"memory_mib"`
	Env          map[string]string `json:"env,omitempty"`
	HealthPath   string            `json:"health_path"`
}

// Status is the instance document of the API.
type Status struct {
	Spec
	State     string     `json:"state"`
	Desired   string     `json:"desired_state"` // running | stopped
	Healthy   bool       `json:"healthy"`
	IP        string     `json:"ip,omitempty"`
	Restarts  int        `json:"restarts"`
	ExitCode  *int       `json:"exit_code,omitempty"`
	Error     string     `json:"error,omitempty"`
	CreatedAt time.Time  `json:"created_at"`
	StartedAt *time.Time `json:"started_at,omitempty"`
}

// Public is the instance document as the API and heartbeats show it:
// without the project environment (secrets stay in the 0600 state file
// the agent restarts VMs from).
func (s Status) Public() Status {
	s.Env = nil
	return s
}

// LogLine is one line of app output.
type LogLine struct {
	Time   time.Time `json:"time"`
	Stream string    `json:"stream"`
	Line   string    `json:"line"`
}

const logRing = 2000

// healthFall is how many failed probes in a row make a healthy instance
// unhealthy.
const healthFall = 3

// instance is one microVM and the supervisor that owns it.
type instance struct {
	a    *Agent
	dir  string
	log  *slog.Logger
	wake chan struct{} // pokes the supervisor (capacity 1)
	done chan struct{} // closed when the current supervisor has returned

	mu         sync.Mutex
	st         Status
	saved      []byte // last persisted status
	logs       []LogLine
	logBase    int // sequence number of logs[0]
	logWake    chan struct{}
	logFile    *os.File
	logSize    int64
	machine    vmm.Machine
	conn       net.Conn
	lease      *hostnet.Lease
	image      *rootfs.Image
	release    func()             // of image
	bootDone   func()             // frees the boot slot; idempotent
	bootCancel context.CancelFunc // cancels a boot in progress
}

// doneCh is closed when the current lifecycle has ended.
func (in *instance) doneCh() <-chan struct{} {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.done
}

func (in *instance) status() Status {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.st
}

// update changes the status and persists it (atomically, and only when it
// changed): the state directory is what a restarted agent re-adopts from.
func (in *instance) update(f func(*Status)) {
	in.mu.Lock()
	defer in.mu.Unlock()
	f(&in.st)
	in.a.routes.set(in.st.ID, &in.st)
	b, err := json.Marshal(in.st)
	if err != nil || bytes.Equal(b, in.saved) {
		return
	}
	if err := fsutil.WriteFile(filepath.Join(in.dir, "status.json"), b, 0o600); err != nil {
		in.log.Error("cannot persist instance state", "err", err)
		return
	}
	in.saved = b
}

// publishRoute hands the instance's current route to the data plane.
func (in *instance) publishRoute() {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.a.routes.set(in.st.ID, &in.st)
}

// maxLogFile bounds an instance's log file; one older generation is kept.
const maxLogFile = 8 << 20

// appendLog adds a line to the ring buffer and the instance's log file
// (so logs survive an agent restart) and wakes followers.
func (in *instance) appendLog(stream, line string) {
	l := LogLine{Time: time.Now().UTC(), Stream: stream, Line: line}
	b, _ := json.Marshal(l)
	in.mu.Lock()
	in.writeLogFile(append(b, '\n'))
	in.logs = append(in.logs, l)
	if n := len(in.logs) - logRing; n > 0 {
		in.logs = append(in.logs[:0:0], in.logs[n:]...)
		in.logBase += n
	}
	close(in.logWake)
	in.logWake = make(chan struct{})
	in.mu.Unlock()
}

// writeLogFile appends to logs.ndjson, rotating it beyond maxLogFile.
// in.mu is held.
func (in *instance) writeLogFile(b []byte) {
	path := filepath.Join(in.dir, "logs.ndjson")
	if in.logFile == nil {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return
		}
		in.logFile = f
		if fi, err := f.Stat(); err == nil {
			in.logSize = fi.Size()
		}
	}
	if in.logSize+int64(len(b)) > maxLogFile {
		in.logFile.Close()
		in.logFile = nil
		_ = os.Rename(path, path+".1")
		in.logSize = 0
		in.writeLogFile(b)
		return
	}
	n, _ := in.logFile.Write(b)
	in.logSize += int64(n)
}

// loadLogs fills the ring buffer from the log file (re-adoption).
func (in *instance) loadLogs() {
	b, err := os.ReadFile(filepath.Join(in.dir, "logs.ndjson"))
	if err != nil {
		return
	}
	lines := bytes.Split(b, []byte("\n"))
	if len(lines) > logRing+1 {
		lines = lines[len(lines)-logRing-1:]
	}
	for _, raw := range lines {
		var l LogLine
		if json.Unmarshal(raw, &l) == nil {
			in.logs = append(in.logs, l)
		}
	}
}

// closeLogs closes the log file.
func (in *instance) closeLogs() {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.logFile != nil {
		in.logFile.Close()
		in.logFile = nil
	}
}

// logsSince returns the lines from sequence number from on (or the oldest
// still buffered), the next sequence number, and a channel closed when
// another line arrives.
func (in *instance) logsSince(from int) ([]LogLine, int, <-chan struct{}) {
	in.mu.Lock()
	defer in.mu.Unlock()
	i := min(max(from-in.logBase, 0), len(in.logs))
	return append([]LogLine(nil), in.logs[i:]...), in.logBase + len(in.logs), in.logWake
}

// Desired states (Status.Desired).
const (
	DesiredRunning = "running"
	DesiredStopped = "stopped"
)

// poke wakes the supervisor to re-evaluate desired against actual state.
func (in *instance) poke() {
	select {
	case in.wake <- struct{}{}:
	default:
	}
}

// setDesired records what the instance should be doing and wakes its
// supervisor; stopping also cancels a boot in progress.
func (in *instance) setDesired(d string) {
	in.update(func(s *Status) { s.Desired = d })
	if d == DesiredStopped {
		in.mu.Lock()
		if in.bootCancel != nil {
			in.bootCancel()
		}
		in.mu.Unlock()
	}
	in.poke()
}

// supervise is the instance's one lifecycle: a level-triggered loop that
// compares the desired state with what it observes (is there a live VMM
// process, did it exit, is a retry due) and takes one step towards the
// desired state per iteration — boot, watch, restart after a backoff,
// shut down, give up. Events (API calls, VM exit, agent detach) only wake
// it. It returns on a terminal state (stopped, failed) or when the agent
// detaches, leaving the VM running for the next agent process. m is a
// re-adopted machine, or nil.
func (in *instance) supervise(m vmm.Machine, done chan struct{}) {
	defer close(done)
	defer in.closeLogs()
	var (
		w        *watch // channel and health checks of the current machine
		failures int
		backoff  = time.Second
		retryAt  time.Time
		reason   string
		started  time.Time
	)
	if m != nil {
		w, started = in.watch(m, time.Time{}), time.Now()
		in.update(func(s *Status) { s.State = StateRunning })
	}
	stopWatch := func() {
		if w != nil {
			w.stop()
			w = nil
		}
	}
	for {
		select {
		case <-in.a.detached:
			stopWatch() // the VM keeps running; the next agent re-adopts it
			return
		default:
		}
		desired := in.status().Desired
		switch {
		case desired == DesiredStopped:
			if m != nil {
				in.update(func(s *Status) { s.State = StateStopping; s.Healthy = false })
				in.shutdown(m)
				stopWatch()
				m = nil
			}
			in.finish(StateStopped, "")
			if in.status().Desired == DesiredStopped {
				return
			}
			// Started again while stopping: a fresh lifecycle.
			failures, backoff, retryAt = 0, time.Second, time.Time{}

		case m == nil && failures >= in.a.cfg.MaxRestarts:
			in.finish(StateFailed, reason)
			return

		case m == nil && time.Now().Before(retryAt):
			t := time.NewTimer(time.Until(retryAt))
			select {
			case <-t.C:
			case <-in.wake:
			case <-in.a.detached:
			}
			t.Stop()

		case m == nil:
			var err error
			m, err = in.boot()
			if errors.Is(err, errStopped) {
				m = nil
				continue // desired state changed or the agent detaches
			}
			if err != nil {
				m = nil
				failures++
				reason = fmt.Sprintf("gave up after %d failed starts: %v", failures, err)
				in.log.Warn("instance failed to start", "err", err, "failures", failures)
				in.update(func(s *Status) { s.Error = err.Error(); s.Healthy = false })
				retryAt, backoff = time.Now().Add(backoff), min(backoff*2, in.a.cfg.MaxBackoff)
				continue
			}
			started = time.Now()
			w = in.watch(m, started)

		default: // a VM is running: wait for something to change
			select {
			case <-m.Done():
				stopWatch()
				m = nil
				if time.Since(started) > 5*time.Minute {
					failures, backoff = 0, time.Second // it ran well; not a crash loop
				}
				failures++
				reason = fmt.Sprintf("crashed %d times in a row", failures)
				in.update(func(s *Status) {
					s.Healthy = false
					s.Restarts++
					if s.Error == "" {
						s.Error = "microVM exited"
					}
				})
				in.log.Warn("instance exited", "failures", failures, "backoff", backoff.String())
				retryAt, backoff = time.Now().Add(backoff), min(backoff*2, in.a.cfg.MaxBackoff)
			case <-in.wake:
			case <-in.a.detached:
			}
		}
	}
}

// watch runs what accompanies a live machine: the agent channel (config,
// logs, exit code) and the health checks; it also bounds how long the
// boot may hold its slot.
type watch struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	bound  *time.Timer
	in     *instance
}

func (in *instance) watch(m vmm.Machine, booted time.Time) *watch {
	in.mu.Lock()
	in.machine = m
	in.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	w := &watch{cancel: cancel, in: in, bound: time.AfterFunc(in.a.cfg.BootTimeout, in.endBoot)}
	w.wg.Go(func() { in.channel(ctx, m) })
	w.wg.Go(func() { in.healthLoop(ctx, booted) })
	return w
}

func (w *watch) stop() {
	w.bound.Stop()
	w.in.endBoot()
	w.cancel()
	w.wg.Wait()
	w.in.mu.Lock()
	w.in.machine, w.in.conn = nil, nil
	w.in.mu.Unlock()
}

var errStopped = errors.New("stopped")

// endBoot frees the instance's boot slot, if it holds one.
func (in *instance) endBoot() {
	in.mu.Lock()
	f := in.bootDone
	in.bootDone = nil
	in.mu.Unlock()
	if f != nil {
		f()
	}
}

// finish records a terminal state and frees the VM's resources.
func (in *instance) finish(state, reason string) {
	select {
	case <-in.a.detached:
		return // the agent is going away; the next one takes over
	default:
	}
	in.mu.Lock()
	lease, release := in.lease, in.release
	in.lease, in.release, in.machine, in.image = nil, nil, nil, nil
	in.mu.Unlock()
	if release != nil {
		release()
	}
	if lease != nil {
		_ = in.a.net.Release(in.st.ID)
	}
	_ = os.Remove(filepath.Join(in.dir, "disk.qcow2"))
	in.update(func(s *Status) {
		s.State, s.Healthy = state, false
		if reason != "" {
			s.Error = reason
		}
	})
}

// boot prepares the root disk and network and starts the VM.
func (in *instance) boot() (vmm.Machine, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stopOnDetach := context.AfterFunc(in.a.detachCtx, cancel)
	defer stopOnDetach()
	in.mu.Lock()
	in.bootCancel = cancel
	in.mu.Unlock()
	defer func() {
		in.mu.Lock()
		in.bootCancel = nil
		in.mu.Unlock()
	}()
	if in.status().Desired == DesiredStopped {
		return nil, errStopped
	}
	spec := in.status().Spec
	in.update(func(s *Status) { s.State = StatePreparing })
	img, err := in.acquireImage(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, errStopped
		}
		return nil, err
	}
	lease, err := in.a.net.Allocate(spec.ID, spec.Port)
	if err != nil {
		return nil, err
	}
	in.mu.Lock()
	in.lease = lease
	in.mu.Unlock()
	in.update(func(s *Status) { s.State = StateStarting; s.IP = lease.GuestIP })
	// Boots are CPU-bound (all of it under software emulation): at most
	// BootConcurrency at a time; the slot is held until the guest's init
	// reports ready (see channel) or a bound passes.
	select {
	case in.a.bootSlots <- struct{}{}:
	case <-ctx.Done():
		return nil, errStopped
	}
	var once sync.Once
	in.mu.Lock()
	in.bootDone = func() { once.Do(func() { <-in.a.bootSlots }) }
	in.mu.Unlock()
	m, err := in.a.vmm.Start(ctx, vmm.Spec{
		ID: spec.ID, VCPUs: spec.VCPUs, MemoryMiB: spec.MemoryMiB,
		Kernel: in.a.kernel.BzImage, Initrd: in.a.kernel.Initrd,
		RootDisk: img.Path, Tap: lease.Tap, MAC: lease.MAC, Dir: in.dir,
	})
	if err != nil {
		in.endBoot()
		if ctx.Err() != nil {
			return nil, errStopped
		}
		return nil, err
	}
	// The run configuration is sent once the channel is up (see channel).
	cfg := &guest.Config{
		Entrypoint: img.Config.Entrypoint, Cmd: img.Config.Cmd, WorkDir: img.Config.WorkDir,
		UID: img.Config.UID, GID: img.Config.GID, Groups: img.Config.Groups, Hostname: shortID(spec.ID),
		Address: lease.GuestCIDR(), Gateway: lease.HostIP, MTU: 1500, DNS: in.a.cfg.DNS, StopGraceMS: int(in.a.cfg.StopGrace / time.Millisecond),
		Env: runEnv(img.Config, spec),
	}
	b, _ := json.Marshal(cfg)
	if err := os.WriteFile(filepath.Join(in.dir, "guest-config.json"), b, 0o600); err != nil {
		_ = m.Kill()
		return nil, err
	}
	in.mu.Lock()
	in.machine = m
	in.mu.Unlock()
	now := time.Now().UTC()
	in.update(func(s *Status) { s.StartedAt = &now; s.Error = ""; s.ExitCode = nil })
	return m, nil
}

// acquireImage returns the instance's converted image, marking it in use.
// After the first pull the image is pinned by digest (image.json), so
// restarts and re-adoption never depend on the registry or a moving tag.
func (in *instance) acquireImage(ctx context.Context) (*rootfs.Image, error) {
	in.mu.Lock()
	img := in.image
	in.mu.Unlock()
	if img != nil {
		return img, nil
	}
	ref := in.status().Image
	var pinned rootfs.Image
	if b, err := os.ReadFile(filepath.Join(in.dir, "image.json")); err == nil && json.Unmarshal(b, &pinned) == nil && pinned.Ref != "" {
		ref = pinned.Ref
	}
	img, release, err := in.a.images.Get(ctx, ref)
	if err != nil {
		return nil, err
	}
	b, _ := json.Marshal(img)
	if err := fsutil.WriteFile(filepath.Join(in.dir, "image.json"), b, 0o600); err != nil {
		release()
		return nil, err
	}
	in.mu.Lock()
	in.image, in.release = img, release
	in.mu.Unlock()
	return img, nil
}

// runEnv is the app's environment: the image's, then PORT, then the
// project's (later wins), plus HOME from the image's passwd when unset.
func runEnv(c rootfs.Config, spec Spec) []string {
	var keys []string
	vals := map[string]string{}
	set := func(k, v string) {
		if _, ok := vals[k]; !ok {
			keys = append(keys, k)
		}
		vals[k] = v
	}
	for _, kv := range c.Env {
		k, v, _ := strings.Cut(kv, "=")
		set(k, v)
	}
	set("PORT", strconv.Itoa(spec.Port))
	projectKeys := make([]string, 0, len(spec.Env))
	for k := range spec.Env {
		projectKeys = append(projectKeys, k)
	}
	sort.Strings(projectKeys)
	for _, k := range projectKeys {
		set(k, spec.Env[k])
	}
	if _, ok := vals["HOME"]; !ok && c.Home != "" {
		set("HOME", c.Home)
	}
	if _, ok := vals["PATH"]; !ok {
		set("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	out := make([]string, 0, len(keys))
	for _, k := range keys {
		out = append(out, k+"="+vals[k])
	}
	return out
}

func shortID(id string) string {
	if len(id) > 12 {
		return "zw-" + id[len(id)-12:]
	}
	return "zw-" + id
}

// channel talks to the guest's init: sends the run configuration on the
// first connection, then collects log lines and the exit code. After an
// agent restart it reconnects without resending the configuration (init
// only takes one).
func (in *instance) channel(ctx context.Context, m vmm.Machine) {
	conn, err := guest.Dial(ctx, m.DialAgent)
	if err != nil {
		return
	}
	defer conn.Close()
	go func() { <-ctx.Done(); conn.Close() }()
	in.mu.Lock()
	in.conn = conn
	in.mu.Unlock()
	r := guest.NewReader(conn)
	w := guest.NewWriter(conn)
	for {
		f, err := r.Next()
		if err != nil {
			return
		}
		switch f.Type {
		case guest.TypeReady:
			in.endBoot()
			in.update(func(s *Status) { s.State = StateRunning })
			b, err := os.ReadFile(filepath.Join(in.dir, "guest-config.json"))
			if err != nil {
				in.log.Error("no guest configuration to send", "err", err)
				continue
			}
			var cfg guest.Config
			_ = json.Unmarshal(b, &cfg)
			if err := w.Send(&guest.Frame{Type: guest.TypeConfig, Config: &cfg}); err != nil {
				return
			}
		case guest.TypeLog:
			in.appendLog(f.Stream, f.Line)
		case guest.TypeExit:
			code := *f.Code
			in.update(func(s *Status) {
				s.ExitCode = &code
				s.Error = f.Error
				if s.Error == "" {
					s.Error = fmt.Sprintf("app exited with code %d", code)
				}
			})
		}
	}
}

// shutdown asks init to stop the app, then kills the VM after the grace
// period.
func (in *instance) shutdown(m vmm.Machine) {
	in.mu.Lock()
	conn := in.conn
	in.mu.Unlock()
	asked := false
	if conn != nil {
		asked = guest.NewWriter(conn).Send(&guest.Frame{Type: guest.TypeStop}) == nil
	}
	if !asked {
		// No agent channel (init not up yet, or gone): ask the VMM for an
		// ACPI / Ctrl-Alt-Del shutdown where it can.
		if s, ok := m.(interface{ Shutdown(context.Context) error }); ok {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			asked = s.Shutdown(ctx) == nil
			cancel()
		}
	}
	grace := in.a.cfg.StopGrace + 5*time.Second
	if !asked {
		grace = time.Second
	}
	select {
	case <-m.Done():
	case <-time.After(grace):
		in.log.Warn("VM did not power off in time; killing it", "grace", grace.String())
		_ = m.Kill()
	}
}

// healthLoop probes the app over HTTP on its port.
func (in *instance) healthLoop(ctx context.Context, booted time.Time) {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	t := time.NewTicker(in.a.cfg.HealthInterval)
	defer t.Stop()
	fails := 0
	for {
		st := in.status()
		if st.IP != "" {
			path := st.HealthPath
			if path == "" {
				path = "/"
			}
			url := fmt.Sprintf("http://%s%s", net.JoinHostPort(st.IP, fmt.Sprint(st.Port)), path)
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			resp, err := client.Do(req)
			ok := err == nil && resp.StatusCode >= 200 && resp.StatusCode < 400
			if resp != nil {
				resp.Body.Close()
			}
			if ctx.Err() != nil {
				return
			}
			// Healthy after one passing probe, unhealthy after healthFall
			// failing ones in a row: one slow answer does not eject it.
			if ok {
				fails = 0
			} else {
				fails++
			}
			in.update(func(s *Status) {
				switch {
				case s.State != StateRunning:
					s.Healthy = false
				case ok && !s.Healthy:
					s.Healthy = true
					if !booted.IsZero() {
						in.a.metrics.bootTime.Observe(time.Since(booted).Seconds())
						booted = time.Time{}
					}
				case !ok && (fails >= healthFall || !s.Healthy):
					s.Healthy = false
				}
			})
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
