// Package nodeagent is the worker daemon (zeitwork-node-agent, :8081): it
// turns "run image X as instance Y" into a microVM, supervises it (health
// checks, restarts with backoff, graceful stop), re-adopts running VMs
// after its own restart, reports to the operator, and proxies HTTP from
// edge proxies to its VMs so VM addresses never leave the node.
package nodeagent

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/builder"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/fsutil"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
	"github.com/zeitwork/zeitwork/internal/hostmetrics"
	"github.com/zeitwork/zeitwork/internal/hostnet"
	"github.com/zeitwork/zeitwork/internal/httpjson"
	"github.com/zeitwork/zeitwork/internal/rootfs"
	"github.com/zeitwork/zeitwork/internal/vmm"
	"github.com/zeitwork/zeitwork/internal/vmm/firecracker"
	"github.com/zeitwork/zeitwork/internal/vmm/qemu"
)

// Config is the agent's configuration.
type Config struct {
	Addr            string
	Advertise       string // URL others use to reach this agent
	NodeID          string
	Region          string
	WorkDir         string
	Operators       []*url.URL
	Token           string
	Subnet          netip.Prefix
	EgressNAT       bool
	KernelDir       string
	InitBin         string
	VMM             string
	QEMUBin         string
	VMNice          int // niceness of the VMM processes
	FirecrackerBin  string
	JailerBin       string // empty: no jailer
	JailerUID       int
	JailerGID       int
	JailerChroot    string
	Insecure        []string
	DNS             []string
	CacheBytes      int64
	HealthInterval  time.Duration
	Heartbeat       time.Duration
	StopGrace       time.Duration
	MaxRestarts     int
	MaxBackoff      time.Duration
	BootTimeout     time.Duration // how long a boot holds its slot at most
	BootConcurrency int           // boots at once
	VCPUs           int           // capacity offered to the operator
	MemoryMiB       int
	Build           BuildConfig
}

// LoadConfig reads the agent's environment.
func LoadConfig(l *envconfig.Loader) Config {
	c := Config{
		Addr:            l.Addr("PORT", ":8081"),
		NodeID:          l.String("NODE_ID", ""),
		Region:          l.String("REGION", "local"),
		WorkDir:         l.String("VM_WORK_DIR", "/var/lib/zeitwork"),
		Operators:       l.URLs("OPERATOR_URL", nil),
		Token:           l.String("CLUSTER_TOKEN", ""),
		EgressNAT:       l.Bool("VM_EGRESS_NAT", false),
		KernelDir:       l.String("KERNEL_DIR", ""),
		InitBin:         l.String("INIT_BIN", ""),
		VMM:             l.Enum("VMM", "qemu", "qemu", "firecracker"),
		QEMUBin:         l.String("QEMU_BIN", "qemu-system-x86_64"),
		VMNice:          l.Int("VM_NICE", vmm.DefaultNice, 0, 19),
		FirecrackerBin:  l.String("FIRECRACKER_BIN", "firecracker"),
		JailerBin:       l.String("JAILER_BIN", ""),
		JailerUID:       l.Int("JAILER_UID", 0, 0, 1<<31-1),
		JailerGID:       l.Int("JAILER_GID", 0, 0, 1<<31-1),
		JailerChroot:    l.String("JAILER_CHROOT_BASE", "/srv/jailer"),
		Insecure:        l.List("INSECURE_REGISTRIES", nil),
		DNS:             l.List("VM_DNS", []string{"1.1.1.1", "8.8.8.8"}),
		CacheBytes:      int64(l.Int("IMAGE_CACHE_MIB", 20480, 64, 1<<24)) << 20,
		HealthInterval:  l.Duration("HEALTH_INTERVAL", time.Second),
		Heartbeat:       l.Duration("HEARTBEAT_INTERVAL", 5*time.Second),
		StopGrace:       l.Duration("STOP_GRACE", 10*time.Second),
		MaxRestarts:     l.Int("MAX_RESTARTS", 5, 1, 1000),
		MaxBackoff:      l.Duration("MAX_BACKOFF", 30*time.Second),
		BootTimeout:     l.Duration("BOOT_TIMEOUT", 60*time.Second),
		BootConcurrency: l.Int("BOOT_CONCURRENCY", max(2, runtime.NumCPU()), 1, 1024),
		VCPUs:           l.Int("NODE_VCPUS", runtime.NumCPU()*4, 1, 100000),
		MemoryMiB:       l.Int("NODE_MEMORY_MIB", hostMemoryMiB(), 128, 1<<30),
	}
	c.Build = loadBuildConfig(l)
	if a := l.String("LISTEN_ADDR", ""); a != "" {
		c.Addr = l.Addr("LISTEN_ADDR", a)
	}
	sub := l.String("VM_SUBNET", "10.100.0.0/16")
	p, err := netip.ParsePrefix(sub)
	if err != nil || !p.Addr().Is4() || p.Bits() > 28 {
		l.Errorf("VM_SUBNET", "%q is not an IPv4 prefix of /28 or larger", sub)
	}
	c.Subnet = p.Masked()
	c.Advertise = l.String("NODE_ADVERTISE_ADDR", "")
	if c.Advertise == "" {
		host, port, _ := net.SplitHostPort(c.Addr)
		if host == "" {
			host, _ = os.Hostname()
		}
		c.Advertise = "http://" + net.JoinHostPort(host, port)
	}
	if len(c.Operators) > 0 && c.Token == "" {
		l.Errorf("CLUSTER_TOKEN", "is required with OPERATOR_URL")
	}
	if c.JailerBin != "" && c.VMM != "firecracker" {
		l.Errorf("JAILER_BIN", "is only used with VMM=firecracker")
	}
	if c.Token == "" && l.String("ENVIRONMENT", "production") == "production" {
		l.Errorf("CLUSTER_TOKEN", "is required in production (the instance API and data plane authenticate with it)")
	}
	return c
}

func hostMemoryMiB() int {
	var si syscall.Sysinfo_t
	if syscall.Sysinfo(&si) != nil {
		return 4096
	}
	return int(uint64(si.Totalram) * uint64(si.Unit) >> 20)
}

// Agent is the running node agent.
type Agent struct {
	cfg       Config
	log       *slog.Logger
	vmm       vmm.VMM
	kernel    *guestkernel.Kernel
	images    *rootfs.Store
	net       *hostnet.Manager
	metrics   *metrics
	client    *http.Client
	bootSlots chan struct{}
	routes    *routeTable      // what the data plane process serves
	builds    *builder.Builder // nil when the node runs no builds

	mu           sync.Mutex
	instances    map[string]*instance
	closing      bool
	detached     chan struct{}   // closed when the agent stops: supervisors let go of their VMs
	detachCtx    context.Context // done when detached is closed
	cancelDetach context.CancelFunc
	wg           sync.WaitGroup // instance supervisors
}

type metrics struct {
	instances *prometheus.GaugeVec
	bootTime  prometheus.Histogram
}

// New prepares the agent: work directory, node id, kernel, image store,
// networking; it re-adopts the VMs of a previous run.
func New(ctx context.Context, cfg Config, reg prometheus.Registerer, log *slog.Logger) (*Agent, error) {
	if err := os.MkdirAll(filepath.Join(cfg.WorkDir, "instances"), 0o755); err != nil {
		return nil, fmt.Errorf("cannot create VM_WORK_DIR: %w", err)
	}
	if cfg.NodeID == "" {
		id, err := persistentID(filepath.Join(cfg.WorkDir, "node-id"))
		if err != nil {
			return nil, err
		}
		cfg.NodeID = id
	}
	var err error
	if cfg.BootConcurrency < 1 {
		cfg.BootConcurrency = 2
	}
	if cfg.BootTimeout <= 0 {
		cfg.BootTimeout = 60 * time.Second
	}
	a := &Agent{cfg: cfg, bootSlots: make(chan struct{}, cfg.BootConcurrency), log: log.With("node_id", cfg.NodeID), instances: map[string]*instance{}, detached: make(chan struct{}), client: &http.Client{Timeout: 10 * time.Second}}
	a.detachCtx, a.cancelDetach = context.WithCancel(context.Background())
	a.routes = newRouteTable(cfg.WorkDir, cfg.NodeID, a.log)
	if a.vmm, err = newVMM(cfg); err != nil {
		return nil, err
	}
	a.log.Info("microVM backend", "vmm", a.vmm.Name(), "accelerator", accelerator(a.vmm))
	initBin := cfg.InitBin
	if initBin == "" {
		self, _ := os.Executable()
		initBin = filepath.Join(filepath.Dir(self), "zeitwork-init")
	}
	kdir := cfg.KernelDir
	if kdir == "" {
		kdir = filepath.Join(cfg.WorkDir, "kernel")
	}
	if a.kernel, err = guestkernel.Ensure(ctx, kdir, initBin); err != nil {
		return nil, fmt.Errorf("cannot prepare the guest kernel: %w", err)
	}
	if a.images, err = rootfs.New(rootfs.Settings{Dir: filepath.Join(cfg.WorkDir, "images"), MaxBytes: cfg.CacheBytes, Insecure: cfg.Insecure, Log: log}); err != nil {
		return nil, err
	}
	if a.net, err = hostnet.New(hostnet.Config{Subnet: cfg.Subnet, StateDir: filepath.Join(cfg.WorkDir, "net"), EgressNAT: cfg.EgressNAT}); err != nil {
		return nil, err
	}
	if err := a.net.Setup(); err != nil {
		return nil, fmt.Errorf("cannot set up VM networking: %w", err)
	}
	if a.builds, err = a.newBuilder(initBin); err != nil {
		return nil, fmt.Errorf("cannot set up builds: %w", err)
	}
	a.metrics = &metrics{
		instances: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "zeitwork_node_agent_instances", Help: "Instances by state."}, []string{"state"}),
		bootTime:  prometheus.NewHistogram(prometheus.HistogramOpts{Name: "zeitwork_node_agent_boot_seconds", Help: "Spawn to healthy.", Buckets: prometheus.ExponentialBuckets(0.25, 2, 10)}),
	}
	if reg != nil {
		reg.MustRegister(a.metrics.instances, a.metrics.bootTime)
		// The host's CPU, memory, disk and network; VM taps (hostnet
		// names them zw…) are left out: one series per VM is unbounded.
		reg.MustRegister(hostmetrics.New(hostmetrics.Config{FilesystemPath: cfg.WorkDir, TapPrefixes: []string{"zw"}}))
	}
	a.adopt(ctx)
	// The table is rewritten from what this process knows: whatever a
	// previous one left is replaced.
	for _, in := range a.instances {
		in.publishRoute()
	}
	a.routes.write()
	return a, nil
}

// newVMM returns the configured backend.
func newVMM(cfg Config) (vmm.VMM, error) {
	switch cfg.VMM {
	case "qemu", "":
		q, err := qemu.New()
		if err != nil {
			return nil, err
		}
		if cfg.QEMUBin != "" && cfg.QEMUBin != "qemu-system-x86_64" {
			q.Bin = cfg.QEMUBin
		}
		q.Nice = cfg.VMNice
		return q, nil
	case "firecracker":
		fc := firecracker.Config{Bin: cfg.FirecrackerBin, Nice: cfg.VMNice}
		if cfg.JailerBin != "" {
			fc.Jailer = &firecracker.JailerConfig{Bin: cfg.JailerBin, UID: cfg.JailerUID, GID: cfg.JailerGID, ChrootBaseDir: cfg.JailerChroot}
		}
		// The backend boots the ELF kernel it extracts from the
		// bzImage it is given (guestkernel.EnsureVmlinux).
		f, err := firecracker.New(fc)
		if err != nil {
			return nil, err
		}
		return f, nil
	default:
		return nil, fmt.Errorf("VMM %q is not available", cfg.VMM)
	}
}

// accelerator names what runs the guests' CPUs (kvm, tcg), when the
// backend says.
func accelerator(v vmm.VMM) string {
	switch b := v.(type) {
	case interface{ Accelerator() string }:
		return b.Accelerator()
	case *qemu.QEMU:
		return string(b.Accel)
	}
	return "kvm"
}

func persistentID(path string) (string, error) {
	if b, err := os.ReadFile(path); err == nil && len(bytes.TrimSpace(b)) > 0 {
		return string(bytes.TrimSpace(b)), nil
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	h := hex.EncodeToString(b[:])
	id := h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
	if err := fsutil.WriteFile(path, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("cannot persist node id: %w", err)
	}
	return id, nil
}

// NodeID is the agent's persistent id.
func (a *Agent) NodeID() string { return a.cfg.NodeID }

// adopt restores instances from the state directory: running VMs are
// re-attached, others restarted if they should be running.
func (a *Agent) adopt(ctx context.Context) {
	dirs, _ := filepath.Glob(filepath.Join(a.cfg.WorkDir, "instances", "*"))
	for _, dir := range dirs {
		var st Status
		b, err := os.ReadFile(filepath.Join(dir, "status.json"))
		if err == nil {
			err = json.Unmarshal(b, &st)
		}
		if err != nil || st.ID == "" || st.ID != filepath.Base(dir) {
			// Half-created (the agent died before persisting it): nobody
			// asked for it any more, so nothing of it may survive.
			a.log.Warn("removing leftover instance directory", "dir", dir)
			if m, err := a.vmm.Adopt(ctx, dir); err == nil {
				_ = m.Kill()
			}
			_ = a.net.Release(filepath.Base(dir))
			_ = os.RemoveAll(dir)
			continue
		}
		in := a.newInstance(st.Spec, dir)
		in.st, in.saved = st, b
		in.loadLogs()
		if in.st.Desired == "" {
			in.st.Desired = DesiredRunning
		}
		if st.State == StateStopped || st.State == StateFailed {
			a.instances[st.ID] = in
			continue
		}
		m, err := a.vmm.Adopt(ctx, dir)
		if err != nil {
			a.log.Info("instance was not running; starting it again", "instance_id", st.ID)
			m = nil
		} else {
			a.log.Info("re-adopted running instance", "instance_id", st.ID, "pid", m.PID())
			if l, ok := a.net.Lease(st.ID); ok {
				in.lease = l
			}
			// Pin the image it runs on, without the registry.
			if _, err := in.acquireImage(ctx); err != nil {
				a.log.Warn("re-adopted instance's image is not in the cache", "instance_id", st.ID, "err", err)
			}
		}
		a.instances[st.ID] = in
		a.launch(in, m)
	}
}

// launch starts in's supervisor unless one is running; m is a re-adopted
// machine or nil.
func (a *Agent) launch(in *instance, m vmm.Machine) {
	in.mu.Lock()
	select {
	case <-in.done: // the previous lifecycle ended (or none ran yet)
	default:
		in.mu.Unlock()
		return
	}
	done := make(chan struct{})
	in.done = done
	in.mu.Unlock()
	a.wg.Go(func() { in.supervise(m, done) })
}

// normalize validates a create request and fills in defaults.
func normalize(spec Spec) (Spec, error) {
	bad := func(format string, args ...any) (Spec, error) {
		return Spec{}, fmt.Errorf("%w: "+format, append([]any{errInvalid}, args...)...)
	}
	if !idPattern.MatchString(spec.ID) {
		return bad("id must match %s", idPattern)
	}
	if spec.Image == "" {
		return bad("image is required")
	}
	if _, err := name.ParseReference(spec.Image); err != nil {
		return bad("image %q is not an image reference: %v", spec.Image, err)
	}
	if spec.Port == 0 {
		spec.Port = 8080
	}
	if spec.Port < 1 || spec.Port > 65535 {
		return bad("port must be 1-65535")
	}
	if spec.VCPUs == 0 {
		spec.VCPUs = 1
	}
	if spec.MemoryMiB == 0 {
		spec.MemoryMiB = 128
	}
	if spec.VCPUs < 1 || spec.VCPUs > 32 || spec.MemoryMiB < 96 || spec.MemoryMiB > 65536 {
		return bad("vcpus must be 1-32 and memory_mib 96-65536")
	}
	if spec.HealthPath != "" && (!strings.HasPrefix(spec.HealthPath, "/") || strings.ContainsAny(spec.HealthPath, " \r\n\x00")) {
		return bad("health_path must be an absolute URL path")
	}
	size := 0
	for k, v := range spec.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return bad("bad environment variable %q", k)
		}
		size += len(k) + len(v) + 1
	}
	if size > 256<<10 {
		return bad("environment is larger than 256 KiB")
	}
	return spec, nil
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)

func (a *Agent) newInstance(spec Spec, dir string) *instance {
	done := make(chan struct{})
	close(done) // no lifecycle yet
	return &instance{
		a: a, dir: dir, log: a.log.With("instance_id", spec.ID, "deployment_id", spec.DeploymentID),
		wake: make(chan struct{}, 1), done: done, logWake: make(chan struct{}),
		st: Status{Spec: spec, State: StatePending, Desired: DesiredRunning, CreatedAt: time.Now().UTC()},
	}
}

// Create starts an instance; creating an existing id returns it unchanged.
func (a *Agent) Create(spec Spec) (Status, bool, error) {
	spec, err := normalize(spec)
	if err != nil {
		return Status{}, false, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closing {
		return Status{}, false, errors.New("agent is shutting down")
	}
	if in, ok := a.instances[spec.ID]; ok {
		return in.status(), false, nil
	}
	cpus, mem := 0, 0
	for _, in := range a.instances {
		if st := in.status(); st.State != StateStopped && st.State != StateFailed {
			cpus, mem = cpus+st.VCPUs, mem+st.MemoryMiB
		}
	}
	if cpus+spec.VCPUs > a.cfg.VCPUs || mem+spec.MemoryMiB > a.cfg.MemoryMiB {
		return Status{}, false, fmt.Errorf("%w: %d vCPUs and %d MiB requested, %d vCPUs and %d MiB free",
			errCapacity, spec.VCPUs, spec.MemoryMiB, a.cfg.VCPUs-cpus, a.cfg.MemoryMiB-mem)
	}
	dir := filepath.Join(a.cfg.WorkDir, "instances", spec.ID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Status{}, false, err
	}
	in := a.newInstance(spec, dir)
	in.update(func(*Status) {})
	a.instances[spec.ID] = in
	a.launch(in, nil)
	return in.status(), true, nil
}

var (
	errInvalid  = errors.New("invalid request")
	errNotFound = errors.New("not found")
	errCapacity = errors.New("insufficient capacity")
)

func (a *Agent) get(id string) (*instance, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	in, ok := a.instances[id]
	if !ok {
		return nil, fmt.Errorf("%w: no instance %s", errNotFound, id)
	}
	return in, nil
}

// Stop asks for an instance's VM to stop (gracefully, then forced); the
// instance stays listed as stopped and can be started again.
func (a *Agent) Stop(id string) (Status, error) {
	in, err := a.get(id)
	if err != nil {
		return Status{}, err
	}
	in.setDesired(DesiredStopped)
	return in.status(), nil
}

// Start asks for a stopped or failed instance to run again (a running one
// is left alone).
func (a *Agent) Start(id string) (Status, error) {
	in, err := a.get(id)
	if err != nil {
		return Status{}, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closing {
		return Status{}, errors.New("agent is shutting down")
	}
	in.setDesired(DesiredRunning)
	in.update(func(s *Status) {
		if s.State == StateFailed || s.State == StateStopped {
			s.State, s.Error, s.ExitCode = StatePending, "", nil
		}
	})
	a.launch(in, nil)
	return in.status(), nil
}

// Delete stops an instance and removes everything it left on the node.
func (a *Agent) Delete(ctx context.Context, id string) error {
	in, err := a.get(id)
	if err != nil {
		return err
	}
	in.setDesired(DesiredStopped)
	select {
	case <-in.doneCh():
	case <-ctx.Done():
		return ctx.Err()
	}
	a.mu.Lock()
	delete(a.instances, id)
	a.mu.Unlock()
	a.routes.set(id, nil)
	var errs []error
	errs = append(errs, a.net.Release(id))
	errs = append(errs, os.RemoveAll(in.dir))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cannot remove instance %s: %w", id, err)
	}
	return nil
}

// List returns every instance, sorted by creation.
func (a *Agent) List() []Status {
	a.mu.Lock()
	ins := make([]*instance, 0, len(a.instances))
	for _, in := range a.instances {
		ins = append(ins, in)
	}
	a.mu.Unlock()
	out := make([]Status, 0, len(ins))
	for _, in := range ins {
		out = append(out, in.status().Public())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out
}

// Run serves until ctx ends. VMs keep running when the agent stops: they
// are re-adopted by the next agent process.
func (a *Agent) Run(ctx context.Context) error {
	t := time.NewTicker(a.cfg.Heartbeat)
	defer t.Stop()
	registered := false
	for {
		a.updateGauges()
		if len(a.cfg.Operators) > 0 {
			// Registration first (retried until an operator answers), then
			// heartbeats; an absent operator only costs a warning.
			path := "heartbeat"
			if !registered {
				path = "register"
			}
			if err := a.report(ctx, path); err != nil {
				if ctx.Err() == nil {
					a.log.Warn("cannot reach the operator", "call", path, "err", err)
				}
			} else if !registered {
				registered = true
				a.log.Info("registered with the operator")
			}
		}
		select {
		case <-ctx.Done():
			a.detach()
			return nil
		case <-t.C:
		}
	}
}

// detach lets go of the VMs without stopping them and waits for every
// supervisor to return.
func (a *Agent) detach() {
	a.mu.Lock()
	a.closing = true
	a.mu.Unlock()
	close(a.detached)
	a.cancelDetach()
	a.wg.Wait()
	if a.builds != nil {
		a.builds.Close() // builds do not survive the agent; see internal/builder
	}
}

func (a *Agent) updateGauges() {
	counts := map[string]float64{}
	for _, st := range []string{StatePending, StatePreparing, StateStarting, StateRunning, StateStopping, StateStopped, StateFailed} {
		counts[st] = 0
	}
	for _, s := range a.List() {
		counts[s.State]++
	}
	for k, v := range counts {
		a.metrics.instances.WithLabelValues(k).Set(v)
	}
}

func (a *Agent) buildCapacity() int {
	if a.builds == nil {
		return 0
	}
	return a.builds.Capacity()
}

func (a *Agent) buildList() []build.Status {
	if a.builds == nil {
		return []build.Status{}
	}
	return a.builds.List()
}

// Info is GET /node/info.
func (a *Agent) Info() map[string]any {
	host, _ := os.Hostname()
	return map[string]any{
		"id": a.cfg.NodeID, "hostname": host, "region": a.cfg.Region, "address": a.cfg.Advertise,
		"vmm": a.vmm.Name(), "accelerator": accelerator(a.vmm), "kernel": a.kernel.Version,
		"vm_subnet": a.cfg.Subnet.String(),
	}
}

// Resources is the body of GET /node/resources: the host's real capacity,
// the capacity offered to the operator, and what instances were given.
type Resources struct {
	HostCPUs           int    `json:"host_cpus"`
	HostMemoryMiB      int    `json:"host_memory_mib"`
	HostMemoryFreeMiB  int    `json:"host_memory_free_mib"`
	VCPUs              int    `json:"vcpus"`
	MemoryMiB          int    `json:"memory_mib"`
	AllocatedVCPUs     int    `json:"allocated_vcpus"`
	AllocatedMemoryMiB int    `json:"allocated_memory_mib"`
	FreeVCPUs          int    `json:"free_vcpus"`
	FreeMemoryMiB      int    `json:"free_memory_mib"`
	Instances          int    `json:"instances"`
	DiskBytes          uint64 `json:"disk_bytes"`
	DiskFreeBytes      uint64 `json:"disk_free_bytes"`
	ImageCacheBytes    int64  `json:"image_cache_bytes"`
	ImageCacheImages   int    `json:"image_cache_images"`
}

// Resources measures the host and sums the live instances' allocations.
func (a *Agent) Resources() Resources {
	r := Resources{HostCPUs: runtime.NumCPU(), HostMemoryMiB: hostMemoryMiB(), VCPUs: a.cfg.VCPUs, MemoryMiB: a.cfg.MemoryMiB}
	for _, s := range a.List() {
		if s.State != StateStopped && s.State != StateFailed {
			r.AllocatedVCPUs += s.VCPUs
			r.AllocatedMemoryMiB += s.MemoryMiB
			r.Instances++
		}
	}
	r.FreeVCPUs, r.FreeMemoryMiB = a.cfg.VCPUs-r.AllocatedVCPUs, a.cfg.MemoryMiB-r.AllocatedMemoryMiB
	var fs syscall.Statfs_t
	if syscall.Statfs(a.cfg.WorkDir, &fs) == nil {
		r.DiskBytes, r.DiskFreeBytes = fs.Blocks*uint64(fs.Bsize), fs.Bavail*uint64(fs.Bsize)
	}
	var si syscall.Sysinfo_t
	if syscall.Sysinfo(&si) == nil {
		r.HostMemoryFreeMiB = int((uint64(si.Freeram) + uint64(si.Bufferram)) * uint64(si.Unit) >> 20)
	}
	u := a.images.Usage()
	r.ImageCacheBytes, r.ImageCacheImages = u.Bytes, u.Images
	return r
}

// report sends the node's registration or heartbeat to the first
// operator that accepts it.
func (a *Agent) report(ctx context.Context, call string) error {
	var body bytes.Buffer
	host, _ := os.Hostname()
	res := a.Resources()
	_ = json.NewEncoder(&body).Encode(map[string]any{
		"id": a.cfg.NodeID, "hostname": host, "region": a.cfg.Region, "address": a.cfg.Advertise,
		"vcpus": a.cfg.VCPUs, "memory_mib": a.cfg.MemoryMiB, "disk_bytes": res.DiskBytes,
		"instances": a.List(), "resources": res,
		"max_builds": a.buildCapacity(), "builds": a.buildList(),
	})
	var lastErr error
	for _, op := range a.cfg.Operators {
		u := op.JoinPath("/api/v1/internal/nodes/register")
		if call == "heartbeat" {
			u = op.JoinPath("/api/v1/internal/nodes", a.cfg.NodeID, "heartbeat")
		}
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		req, _ := http.NewRequestWithContext(rctx, http.MethodPost, u.String(), bytes.NewReader(body.Bytes()))
		req.Header.Set("Authorization", "Bearer "+a.cfg.Token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := a.client.Do(req)
		if err != nil {
			cancel()
			lastErr = err
			continue
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
		resp.Body.Close()
		cancel()
		if resp.StatusCode/100 == 2 {
			return nil
		}
		lastErr = fmt.Errorf("%s: status %d", u, resp.StatusCode)
	}
	return lastErr
}

// Handler serves the API (cluster-token authenticated), /health* and
// /metrics. The data plane process in front of it (ADR 0354) answers
// requests for instances itself and forwards everything else here.
func (a *Agent) Handler(admin http.Handler) http.Handler {
	api := http.NewServeMux()
	api.HandleFunc("POST /instances", a.handleCreate)
	api.HandleFunc("GET /instances", func(w http.ResponseWriter, r *http.Request) { httpjson.Write(w, 200, a.List()) })
	api.HandleFunc("GET /instances/{id}", func(w http.ResponseWriter, r *http.Request) {
		in, err := a.get(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		httpjson.Write(w, 200, in.status().Public())
	})
	api.HandleFunc("POST /instances/{id}/stop", func(w http.ResponseWriter, r *http.Request) {
		st, err := a.Stop(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		httpjson.Write(w, 202, st.Public())
	})
	api.HandleFunc("POST /instances/{id}/start", func(w http.ResponseWriter, r *http.Request) {
		st, err := a.Start(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		httpjson.Write(w, 202, st.Public())
	})
	api.HandleFunc("DELETE /instances/{id}", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), a.cfg.StopGrace+30*time.Second)
		defer cancel()
		if err := a.Delete(ctx, r.PathValue("id")); err != nil {
			writeErr(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	api.HandleFunc("GET /instances/{id}/logs", a.handleLogs)
	a.buildRoutes(api)
	api.HandleFunc("GET /node/info", func(w http.ResponseWriter, r *http.Request) { httpjson.Write(w, 200, a.Info()) })
	api.HandleFunc("GET /node/resources", func(w http.ResponseWriter, r *http.Request) { httpjson.Write(w, 200, a.Resources()) })

	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/health") || r.URL.Path == "/metrics" {
			admin.ServeHTTP(w, r)
			return
		}
		if !a.tokenOK(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")) {
			httpjson.Write(w, 401, httpjson.Error("unauthorized", "bad or missing cluster token"))
			return
		}
		api.ServeHTTP(w, r)
	})
}

func (a *Agent) tokenOK(got string) bool {
	if a.cfg.Token == "" {
		return true
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(a.cfg.Token)) == 1
}

func (a *Agent) handleCreate(w http.ResponseWriter, r *http.Request) {
	var spec Spec
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		httpjson.Write(w, 400, httpjson.Error("invalid_json", err.Error()))
		return
	}
	st, created, err := a.Create(spec)
	if err != nil {
		writeErr(w, err)
		return
	}
	code := 200
	if created {
		code = 201
	}
	httpjson.Write(w, code, st.Public())
}

func (a *Agent) handleLogs(w http.ResponseWriter, r *http.Request) {
	in, err := a.get(r.PathValue("id"))
	if err != nil {
		writeErr(w, err)
		return
	}
	follow := r.URL.Query().Get("follow") == "1" || r.URL.Query().Get("follow") == "true"
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	fl, _ := w.(http.Flusher)
	pos := 0
	for {
		lines, next, wake := in.logsSince(pos)
		for _, l := range lines {
			if enc.Encode(l) != nil {
				return
			}
		}
		pos = next
		if fl != nil {
			fl.Flush()
		}
		if !follow {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-in.doneCh():
			lines, _, _ := in.logsSince(pos)
			for _, l := range lines {
				_ = enc.Encode(l)
			}
			return
		case <-wake:
		}
	}
}

func writeErr(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, errNotFound):
		httpjson.Write(w, 404, httpjson.Error("not_found", err.Error()))
	case errors.Is(err, errCapacity):
		httpjson.Write(w, 409, httpjson.Error("insufficient_capacity", err.Error()))
	case errors.Is(err, errInvalid):
		httpjson.Write(w, 400, httpjson.Error("invalid", err.Error()))
	default:
		httpjson.Write(w, 500, httpjson.Error("internal", err.Error()))
	}
}
