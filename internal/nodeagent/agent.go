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
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
	"github.com/zeitwork/zeitwork/internal/hostnet"
	"github.com/zeitwork/zeitwork/internal/rootfs"
	"github.com/zeitwork/zeitwork/internal/vmm"
	"github.com/zeitwork/zeitwork/internal/vmm/qemu"
)

// Config is the agent's configuration.
type Config struct {
	Addr           string
	Advertise      string // URL others use to reach this agent
	NodeID         string
	Region         string
	WorkDir        string
	Operators      []*url.URL
	Token          string
	Subnet         netip.Prefix
	EgressNAT      bool
	KernelDir      string
	InitBin        string
	VMM            string
	Insecure       []string
	DNS            []string
	CacheBytes     int64
	HealthInterval time.Duration
	Heartbeat      time.Duration
	StopGrace      time.Duration
	MaxRestarts    int
	MaxBackoff     time.Duration
	VCPUs          int // capacity offered to the operator
	MemoryMiB      int
}

// LoadConfig reads the agent's environment.
func LoadConfig(l *envconfig.Loader) Config {
	c := Config{
		Addr:           l.Addr("PORT", ":8081"),
		NodeID:         l.String("NODE_ID", ""),
		Region:         l.String("REGION", "local"),
		WorkDir:        l.String("VM_WORK_DIR", "/var/lib/zeitwork"),
		Operators:      l.URLs("OPERATOR_URL", nil),
		Token:          l.String("CLUSTER_TOKEN", ""),
		EgressNAT:      l.Bool("VM_EGRESS_NAT", false),
		KernelDir:      l.String("KERNEL_DIR", ""),
		InitBin:        l.String("INIT_BIN", ""),
		VMM:            l.Enum("VMM", "qemu", "qemu", "firecracker"),
		Insecure:       l.List("INSECURE_REGISTRIES", nil),
		DNS:            l.List("VM_DNS", []string{"1.1.1.1", "8.8.8.8"}),
		CacheBytes:     int64(l.Int("IMAGE_CACHE_MIB", 20480, 64, 1<<24)) << 20,
		HealthInterval: l.Duration("HEALTH_INTERVAL", time.Second),
		Heartbeat:      l.Duration("HEARTBEAT_INTERVAL", 5*time.Second),
		StopGrace:      l.Duration("STOP_GRACE", 10*time.Second),
		MaxRestarts:    l.Int("MAX_RESTARTS", 5, 1, 1000),
		MaxBackoff:     l.Duration("MAX_BACKOFF", 30*time.Second),
		VCPUs:          l.Int("NODE_VCPUS", runtime.NumCPU()*4, 1, 100000),
		MemoryMiB:      l.Int("NODE_MEMORY_MIB", hostMemoryMiB(), 128, 1<<30),
	}
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
	if c.VMM == "firecracker" {
		l.Errorf("VMM", "firecracker is not available on this build's hosts; use qemu")
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
	cfg     Config
	log     *slog.Logger
	vmm     vmm.VMM
	kernel  *guestkernel.Kernel
	images  *rootfs.Store
	net     *hostnet.Manager
	metrics *metrics
	client  *http.Client

	mu        sync.Mutex
	instances map[string]*instance
	closing   bool
	detached  chan struct{}  // closed when the agent stops: supervisors let go of their VMs
	wg        sync.WaitGroup // instance supervisors
}

type metrics struct {
	instances *prometheus.GaugeVec
	bootTime  prometheus.Histogram
	proxied   *prometheus.CounterVec
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
	a := &Agent{cfg: cfg, log: log.With("node_id", cfg.NodeID), instances: map[string]*instance{}, detached: make(chan struct{}), client: &http.Client{Timeout: 10 * time.Second}}
	q, err := qemu.New()
	if err != nil {
		return nil, err
	}
	a.vmm = q
	a.log.Info("microVM backend", "vmm", q.Name(), "accelerator", string(q.Accel))
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
	a.metrics = &metrics{
		instances: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "zeitwork_node_agent_instances", Help: "Instances by state."}, []string{"state"}),
		bootTime:  prometheus.NewHistogram(prometheus.HistogramOpts{Name: "zeitwork_node_agent_boot_seconds", Help: "Spawn to healthy.", Buckets: prometheus.ExponentialBuckets(0.25, 2, 10)}),
		proxied:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_node_agent_proxied_requests_total", Help: "Data-plane requests by status class."}, []string{"class"}),
	}
	if reg != nil {
		reg.MustRegister(a.metrics.instances, a.metrics.bootTime, a.metrics.proxied)
	}
	a.adopt(ctx)
	return a, nil
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
	if err := os.WriteFile(path, []byte(id+"\n"), 0o644); err != nil {
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
		b, err := os.ReadFile(filepath.Join(dir, "status.json"))
		if err != nil {
			continue
		}
		var st Status
		if json.Unmarshal(b, &st) != nil || st.ID == "" {
			continue
		}
		in := a.newInstance(st.Spec, dir)
		in.st = st
		if st.State == StateStopped || st.State == StateFailed {
			close(in.done)
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
		}
		a.instances[st.ID] = in
		a.wg.Go(func() { in.supervise(m) })
	}
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)

func (a *Agent) newInstance(spec Spec, dir string) *instance {
	return &instance{
		a: a, dir: dir, log: a.log.With("instance_id", spec.ID, "deployment_id", spec.DeploymentID),
		stop: make(chan struct{}), done: make(chan struct{}), logWake: make(chan struct{}),
		st: Status{Spec: spec, State: StatePending, CreatedAt: time.Now().UTC()},
	}
}

// Create starts an instance; creating an existing id returns it unchanged.
func (a *Agent) Create(spec Spec) (Status, bool, error) {
	if !idPattern.MatchString(spec.ID) {
		return Status{}, false, fmt.Errorf("%w: id must match %s", errInvalid, idPattern)
	}
	if spec.Image == "" {
		return Status{}, false, fmt.Errorf("%w: image is required", errInvalid)
	}
	if spec.Port == 0 {
		spec.Port = 8080
	}
	if spec.Port < 1 || spec.Port > 65535 {
		return Status{}, false, fmt.Errorf("%w: port must be 1-65535", errInvalid)
	}
	if spec.VCPUs == 0 {
		spec.VCPUs = 1
	}
	if spec.MemoryMiB == 0 {
		spec.MemoryMiB = 128
	}
	if spec.VCPUs < 1 || spec.VCPUs > 32 || spec.MemoryMiB < 96 || spec.MemoryMiB > 65536 {
		return Status{}, false, fmt.Errorf("%w: vcpus must be 1-32 and memory_mib 96-65536", errInvalid)
	}
	for k := range spec.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return Status{}, false, fmt.Errorf("%w: bad environment variable name %q", errInvalid, k)
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closing {
		return Status{}, false, errors.New("agent is shutting down")
	}
	if in, ok := a.instances[spec.ID]; ok {
		return in.status(), false, nil
	}
	dir := filepath.Join(a.cfg.WorkDir, "instances", spec.ID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Status{}, false, err
	}
	in := a.newInstance(spec, dir)
	in.update(func(*Status) {})
	a.instances[spec.ID] = in
	a.wg.Go(func() { in.supervise(nil) })
	return in.status(), true, nil
}

var (
	errInvalid  = errors.New("invalid request")
	errNotFound = errors.New("not found")
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

// Stop stops an instance's VM (it stays listed as stopped).
func (a *Agent) Stop(id string) (Status, error) {
	in, err := a.get(id)
	if err != nil {
		return Status{}, err
	}
	in.mu.Lock()
	select {
	case <-in.stop:
	default:
		close(in.stop)
	}
	in.mu.Unlock()
	return in.status(), nil
}

// Delete stops an instance and removes everything it left on the node.
func (a *Agent) Delete(ctx context.Context, id string) error {
	in, err := a.Stop(id)
	_ = in
	if err != nil {
		return err
	}
	inst, _ := a.get(id)
	select {
	case <-inst.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	a.mu.Lock()
	delete(a.instances, id)
	a.mu.Unlock()
	_ = a.net.Release(id)
	return os.RemoveAll(inst.dir)
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
		out = append(out, in.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out
}

// Run serves until ctx ends. VMs keep running when the agent stops: they
// are re-adopted by the next agent process.
func (a *Agent) Run(ctx context.Context) error {
	t := time.NewTicker(a.cfg.Heartbeat)
	defer t.Stop()
	for {
		a.updateGauges()
		if len(a.cfg.Operators) > 0 {
			if err := a.heartbeat(ctx); err != nil && ctx.Err() == nil {
				a.log.Warn("heartbeat failed", "err", err)
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
	a.wg.Wait()
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

// Info is GET /node/info.
func (a *Agent) Info() map[string]any {
	q := a.vmm.(*qemu.QEMU)
	host, _ := os.Hostname()
	return map[string]any{
		"id": a.cfg.NodeID, "hostname": host, "region": a.cfg.Region, "address": a.cfg.Advertise,
		"vmm": a.vmm.Name(), "accelerator": string(q.Accel), "kernel": a.kernel.Version,
		"vm_subnet": a.cfg.Subnet.String(),
	}
}

// Resources is GET /node/resources: real host capacity and what instances
// have been given.
func (a *Agent) Resources() map[string]any {
	allocCPU, allocMem := 0, 0
	for _, s := range a.List() {
		if s.State != StateStopped && s.State != StateFailed {
			allocCPU += s.VCPUs
			allocMem += s.MemoryMiB
		}
	}
	var fs syscall.Statfs_t
	var diskTotal, diskFree uint64
	if syscall.Statfs(a.cfg.WorkDir, &fs) == nil {
		diskTotal, diskFree = fs.Blocks*uint64(fs.Bsize), fs.Bavail*uint64(fs.Bsize)
	}
	var si syscall.Sysinfo_t
	_ = syscall.Sysinfo(&si)
	return map[string]any{
		"host_cpus":            runtime.NumCPU(),
		"host_memory_mib":      hostMemoryMiB(),
		"host_memory_free_mib": int(uint64(si.Freeram) * uint64(si.Unit) >> 20),
		"vcpus":                a.cfg.VCPUs,
		"memory_mib":           a.cfg.MemoryMiB,
		"allocated_vcpus":      allocCPU,
		"allocated_memory_mib": allocMem,
		"free_vcpus":           a.cfg.VCPUs - allocCPU,
		"free_memory_mib":      a.cfg.MemoryMiB - allocMem,
		"disk_bytes":           diskTotal,
		"disk_free_bytes":      diskFree,
	}
}

func (a *Agent) heartbeat(ctx context.Context) error {
	var body bytes.Buffer
	host, _ := os.Hostname()
	_ = json.NewEncoder(&body).Encode(map[string]any{
		"id": a.cfg.NodeID, "hostname": host, "region": a.cfg.Region, "address": a.cfg.Advertise,
		"vcpus": a.cfg.VCPUs, "memory_mib": a.cfg.MemoryMiB, "disk_bytes": a.Resources()["disk_bytes"],
		"instances": a.List(), "resources": a.Resources(),
	})
	var lastErr error
	for _, op := range a.cfg.Operators {
		u := op.JoinPath("/api/v1/internal/nodes", a.cfg.NodeID, "heartbeat")
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(body.Bytes()))
		req.Header.Set("Authorization", "Bearer "+a.cfg.Token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := a.client.Do(req)
		if err != nil {
			lastErr = err
			continue
		}
		resp.Body.Close()
		if resp.StatusCode/100 == 2 {
			return nil
		}
		lastErr = fmt.Errorf("%s: status %d", u, resp.StatusCode)
	}
	return lastErr
}

// Handler serves the API (cluster-token authenticated) and the data plane.
func (a *Agent) Handler(admin http.Handler) http.Handler {
	api := http.NewServeMux()
	api.HandleFunc("POST /instances", a.handleCreate)
	api.HandleFunc("GET /instances", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, 200, a.List()) })
	api.HandleFunc("GET /instances/{id}", func(w http.ResponseWriter, r *http.Request) {
		in, err := a.get(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 200, in.status())
	})
	api.HandleFunc("POST /instances/{id}/stop", func(w http.ResponseWriter, r *http.Request) {
		st, err := a.Stop(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 202, st)
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
	api.HandleFunc("GET /node/info", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, 200, a.Info()) })
	api.HandleFunc("GET /node/resources", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, 200, a.Resources()) })

	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if id := r.Header.Get("X-Zeitwork-Instance"); id != "" {
			if !a.tokenOK(r.Header.Get("X-Zeitwork-Token")) {
				writeJSON(w, 401, apiError("unauthorized", "bad or missing X-Zeitwork-Token"))
				return
			}
			a.proxy(w, r, id)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/health") || r.URL.Path == "/metrics" {
			admin.ServeHTTP(w, r)
			return
		}
		if !a.tokenOK(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")) {
			writeJSON(w, 401, apiError("unauthorized", "bad or missing cluster token"))
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
		writeJSON(w, 400, apiError("invalid_json", err.Error()))
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
	writeJSON(w, code, st)
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
		case <-in.done:
			lines, _, _ := in.logsSince(pos)
			for _, l := range lines {
				_ = enc.Encode(l)
			}
			return
		case <-wake:
		}
	}
}

// proxy forwards a data-plane request to the instance's VM.
func (a *Agent) proxy(w http.ResponseWriter, r *http.Request, id string) {
	in, err := a.get(id)
	if err != nil {
		writeJSON(w, 404, apiError("not_found", "no such instance on this node"))
		return
	}
	st := in.status()
	if st.State != StateRunning || st.IP == "" {
		w.Header().Set("Retry-After", "1")
		writeJSON(w, 503, apiError("unavailable", "instance is "+st.State))
		return
	}
	target := &url.URL{Scheme: "http", Host: net.JoinHostPort(st.IP, strconv.Itoa(st.Port))}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host
			pr.Out.Header.Del("X-Zeitwork-Instance")
			pr.Out.Header.Del("X-Zeitwork-Token")
			// Edge proxies set X-Forwarded-*; keep them as they are.
			pr.Out.Header["X-Forwarded-For"] = pr.In.Header["X-Forwarded-For"]
		},
		Transport:     a.transport(),
		FlushInterval: -1,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			a.metrics.proxied.WithLabelValues("error").Inc()
			writeJSON(w, 502, apiError("bad_gateway", "instance did not answer: "+err.Error()))
		},
		ModifyResponse: func(resp *http.Response) error {
			a.metrics.proxied.WithLabelValues(strconv.Itoa(resp.StatusCode/100) + "xx").Inc()
			return nil
		},
	}
	rp.ServeHTTP(w, r)
}

var (
	transportOnce sync.Once
	sharedTr      *http.Transport
)

func (a *Agent) transport() *http.Transport {
	transportOnce.Do(func() {
		sharedTr = &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        1024,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     90 * time.Second,
		}
	})
	return sharedTr
}

type apiErr struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func apiError(code, msg string) apiErr {
	var e apiErr
	e.Error.Code, e.Error.Message = code, msg
	return e
}

func writeErr(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, errNotFound):
		writeJSON(w, 404, apiError("not_found", err.Error()))
	case errors.Is(err, errInvalid):
		writeJSON(w, 400, apiError("invalid", err.Error()))
	default:
		writeJSON(w, 500, apiError("internal", err.Error()))
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
