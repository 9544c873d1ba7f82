// Package topology runs Zeitwork's production layout on one machine: every
// host is a network namespace with its own address, routes and firewall;
// per region a router namespace with a bridge joins the region's operators,
// workers (node agent + data plane + edge proxy + load balancer, real
// microVMs), its GeoDNS server and a client; a core router joins the
// regions through links with added latency and carries the shared
// PostgreSQL host. The latency is added by this process, which carries
// each region's link between two TUN devices (see wire): the kernels this
// runs on lack tc's netem. Every service is a real process of the built
// binaries started inside its namespace with `ip netns exec`, which also
// gives each host its own resolv.conf (its region's GeoDNS server first),
// so operators reach PostgreSQL by name.
//
// Everything the topology creates is named with Prefix; Stop removes it
// all, and Start first removes whatever a crashed run left behind.
package topology

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/zeitwork/zeitwork/internal/devcluster"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
)

// Config describes a topology.
type Config struct {
	BinDir   string // the built binaries (make build)
	StateDir string // logs, data, certificates; wiped on Start
	// Regions default to us-east, eu-west, ap-south.
	Regions []string
	// Delays are the one-way delays of each region's link to the core;
	// default 10, 15 and 30 ms (round trips between regions 50–90 ms).
	Delays             []time.Duration
	OperatorsPerRegion int    // default 3
	WorkersPerRegion   int    // default 6
	Zone               string // platform zone: edge.<zone>, db.internal.<zone>; default zeitwork.test
	AppsDomain         string // default apps.<zone>
	KernelDir          string // guest kernel cache; default /var/cache/zeitwork/kernel
	// DNSTTL is the TTL of the GeoDNS answers; default 5s.
	DNSTTL time.Duration
	// Env adds or overrides variables of every platform service.
	Env map[string]string
}

func (c *Config) defaults() {
	if len(c.Regions) == 0 {
		c.Regions = []string{"us-east", "eu-west", "ap-south"}
	}
	if len(c.Delays) == 0 {
		c.Delays = []time.Duration{10 * time.Millisecond, 15 * time.Millisecond, 30 * time.Millisecond}
	}
	if c.OperatorsPerRegion == 0 {
		c.OperatorsPerRegion = 3
	}
	if c.WorkersPerRegion == 0 {
		c.WorkersPerRegion = 6
	}
	if c.Zone == "" {
		c.Zone = "zeitwork.test"
	}
	if c.AppsDomain == "" {
		c.AppsDomain = "apps." + c.Zone
	}
	if c.KernelDir == "" {
		c.KernelDir = "/var/cache/zeitwork/kernel"
	}
	if c.DNSTTL == 0 {
		c.DNSTTL = 5 * time.Second
	}
}

// Worker is the processes of one worker host.
type Worker struct {
	Host      *Host
	NodeAgent *devcluster.Proc
	Edge      *devcluster.Proc
	LB        *devcluster.Proc
}

// Topology is a running layout.
type Topology struct {
	cfg      Config
	Layout   *Layout
	CA       *devcluster.CA
	Registry *devcluster.Registry
	// DB is the PostgreSQL server process; DBHost the host it runs on.
	DB     *devcluster.Proc
	DBHost *Host
	// DatabaseURL is what the operators use (by name when GeoDNS runs);
	// MgmtDatabaseURL reaches the same database from the root namespace.
	DatabaseURL     string
	MgmtDatabaseURL string
	Operators       map[string]*devcluster.Proc // by host name
	Workers         map[string]*Worker          // by host name
	DNS             map[string]*devcluster.Proc // by host name
	ClusterToken    string
	WebhookSecret   string
	encKey          string
	dnsConfig       string // path of the GeoDNS configuration file

	wires []*wire  // the regions' delayed links to the core, by region
	lock  *os.File // held while the topology runs (lockRun)
	mu    sync.Mutex
}

// Zone is the platform zone; EdgeName the GeoDNS name of the edge.
func (t *Topology) Zone() string       { return t.cfg.Zone }
func (t *Topology) EdgeName() string   { return "edge." + t.cfg.Zone }
func (t *Topology) AppsDomain() string { return t.cfg.AppsDomain }
func (t *Topology) DBName() string     { return "db.internal." + t.cfg.Zone }
func (t *Topology) DNSTTL() time.Duration {
	return t.cfg.DNSTTL
}

// OperatorURL is the API as the root namespace (management network)
// reaches it: the first operator of the first region.
func (t *Topology) OperatorURL() string {
	return "http://" + t.Layout.Regions[0].Of(RoleOperator)[0].IP + ":8080"
}

func (t *Topology) bin(name string) string { return filepath.Join(t.cfg.BinDir, name) }

func (t *Topology) logFile(name string) string {
	return filepath.Join(t.cfg.StateDir, "logs", strings.TrimPrefix(name, Prefix)+".log")
}

// proc is a platform process inside namespace ns.
func (t *Topology) proc(ns, name, bin string, env map[string]string, health string, args ...string) *devcluster.Proc {
	return &devcluster.Proc{Name: name, Path: "ip", Args: append([]string{"netns", "exec", ns, bin}, args...),
		LogFile: t.logFile(name), Env: env, Health: health}
}

// HasDNS reports whether the GeoDNS binary is built.
func HasDNS(binDir string) bool {
	_, err := os.Stat(filepath.Join(binDir, "zeitwork-dns"))
	return err == nil
}

// Start builds the network and starts every process. On error everything
// is torn down again.
func Start(ctx context.Context, cfg Config) (_ *Topology, err error) {
	cfg.defaults()
	if os.Geteuid() != 0 {
		return nil, errors.New("topology: network namespaces need root")
	}
	for _, b := range []string{"zeitwork-operator", "zeitwork-node-agent", "zeitwork-edge-proxy", "zeitwork-load-balancer", "zeitwork-init"} {
		if _, err := os.Stat(filepath.Join(cfg.BinDir, b)); err != nil {
			return nil, fmt.Errorf("missing binary %s in %s (run make build): %w", b, cfg.BinDir, err)
		}
	}
	for _, tool := range []string{"ip", "tc", "nft", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("topology needs %s: %w", tool, err)
		}
	}
	layout, err := NewLayout(cfg.Regions, cfg.Delays, cfg.OperatorsPerRegion, cfg.WorkersPerRegion)
	if err != nil {
		return nil, err
	}
	// The guest kernel is fetched (apt-get download) from the host: the
	// workers' namespaces reach nothing beyond the layout, so their node
	// agents only find it in the shared cache.
	if _, err := guestkernel.Ensure(ctx, cfg.KernelDir, filepath.Join(cfg.BinDir, "zeitwork-init")); err != nil {
		return nil, fmt.Errorf("cannot fetch the guest kernel: %w", err)
	}
	lock, err := lockRun()
	if err != nil {
		return nil, err
	}
	if err := Cleanup(); err != nil {
		lock.Close()
		return nil, fmt.Errorf("cannot remove a previous run's namespaces: %w", err)
	}
	_ = os.RemoveAll(cfg.StateDir)
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		lock.Close()
		return nil, err
	}
	t := &Topology{cfg: cfg, lock: lock, Layout: layout, Operators: map[string]*devcluster.Proc{}, Workers: map[string]*Worker{}, DNS: map[string]*devcluster.Proc{}}
	defer func() {
		if err != nil {
			_ = t.Stop()
		}
	}()
	t.ClusterToken = randHex(24)
	t.WebhookSecret = randHex(24)
	k := make([]byte, 32)
	_, _ = rand.Read(k)
	t.encKey = base64.StdEncoding.EncodeToString(k)
	if t.CA, err = devcluster.EnsureCA(filepath.Join(cfg.StateDir, "ca"), cfg.AppsDomain); err != nil {
		return nil, err
	}
	t.wires, err = layout.buildNetwork()
	if err != nil {
		return nil, fmt.Errorf("cannot build the network: %w", err)
	}
	if err := t.initDB(ctx); err != nil {
		return nil, err
	}
	if err := t.startDB(ctx, layout.DB); err != nil {
		return nil, err
	}
	if t.Registry, err = devcluster.StartRegistry(mgmtIP + ":5000"); err != nil {
		return nil, err
	}
	t.DatabaseURL = t.operatorDBURL(layout.DB.IP)
	if HasDNS(cfg.BinDir) {
		if err := t.startDNS(ctx); err != nil {
			return nil, err
		}
		t.DatabaseURL = t.operatorDBURL(t.DBName())
	}
	if err := t.startAll(ctx, layout.All(RoleOperator), t.startOperator); err != nil {
		return nil, err
	}
	if err := t.startAll(ctx, layout.All(RoleWorker), t.startWorker); err != nil {
		return nil, err
	}
	return t, nil
}

// lockPath is held (flock) by the process running the topology: one
// topology per machine, since the names and addresses are fixed.
const lockPath = "/run/zeitwork-topology.lock"

func lockRun() (*os.File, error) {
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(lockPath)
		f.Close()
		return nil, fmt.Errorf("another topology is running on this machine (pid %s): %w", strings.TrimSpace(string(b)), err)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(fmt.Sprintln(os.Getpid())), 0)
	return f, nil
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// startAll starts fn for every host concurrently and joins their errors.
func (t *Topology) startAll(ctx context.Context, hosts []*Host, fn func(context.Context, *Host) error) error {
	errs := make([]error, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		wg.Go(func() { errs[i] = fn(ctx, h) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (t *Topology) common(region int) map[string]string {
	env := map[string]string{
		"LOG_LEVEL":     "info",
		"ENVIRONMENT":   "development",
		"CLUSTER_TOKEN": t.ClusterToken,
		"APPS_DOMAIN":   t.cfg.AppsDomain,
		"OPERATOR_URL":  t.Layout.OperatorURLs(region),
	}
	return env
}

func merge(dst map[string]string, srcs ...map[string]string) map[string]string {
	for _, s := range srcs {
		for k, v := range s {
			dst[k] = v
		}
	}
	return dst
}

// OperatorEnv is the environment of an operator at ip (also used to run
// its subcommands from the management network with dbURL).
func (t *Topology) OperatorEnv(region int, ip, dbURL string) map[string]string {
	return merge(t.common(region), map[string]string{
		"LISTEN_ADDR":           ip + ":8080",
		"DATABASE_URL":          dbURL,
		"ENCRYPTION_KEY":        t.encKey,
		"EDGE_HOSTNAME":         t.EdgeName(),
		"GITHUB_WEBHOOK_SECRET": t.WebhookSecret,
		"INSECURE_REGISTRIES":   t.Registry.Addr,
		"BUILD_REGISTRY":        t.Registry.Addr,
		"RECONCILE_INTERVAL":    "1s",
	}, t.cfg.Env)
}

func (t *Topology) startOperator(ctx context.Context, h *Host) error {
	p := t.proc(h.Name, h.Name, t.bin("zeitwork-operator"), t.OperatorEnv(h.Region, h.IP, t.DatabaseURL), "http://"+h.IP+":8080/health/live")
	t.mu.Lock()
	t.Operators[h.Name] = p
	t.mu.Unlock()
	return p.Start(ctx, 2*time.Minute)
}

// StartOperator starts a stopped or killed operator again.
func (t *Topology) StartOperator(ctx context.Context, name string) error {
	for _, h := range t.Layout.All(RoleOperator) {
		if h.Name == name {
			return t.startOperator(ctx, h)
		}
	}
	return fmt.Errorf("no operator %s", name)
}

func (t *Topology) nodeAgent(h *Host) *devcluster.Proc {
	r := t.Layout.Regions[h.Region]
	env := merge(t.common(h.Region), map[string]string{
		"LISTEN_ADDR":         h.IP + ":8081",
		"NODE_ADVERTISE_ADDR": "http://" + h.IP + ":8081",
		"REGION":              r.Name,
		"VM_WORK_DIR":         filepath.Join(t.cfg.StateDir, "nodes", h.Name),
		"VM_SUBNET":           h.VMSubnet,
		"KERNEL_DIR":          t.cfg.KernelDir,
		"INSECURE_REGISTRIES": t.Registry.Addr,
		"HEARTBEAT_INTERVAL":  "5s", // the production default (a heartbeat costs several round trips to PostgreSQL)
		"BUILD_CONCURRENCY":   "0",
		"BOOT_CONCURRENCY":    "1",
	}, t.cfg.Env)
	p := t.proc(h.Name, "node-agent-"+h.Name, t.bin("zeitwork-node-agent"), env, "http://"+h.IP+":8081/health/live")
	p.KeepGroup = true
	return p
}

func (t *Topology) startWorker(ctx context.Context, h *Host) error {
	r := t.Layout.Regions[h.Region]
	w := &Worker{Host: h, NodeAgent: t.nodeAgent(h)}
	t.mu.Lock()
	t.Workers[h.Name] = w
	t.mu.Unlock()
	if err := w.NodeAgent.Start(ctx, 5*time.Minute); err != nil {
		return err
	}
	w.Edge = t.proc(h.Name, "edge-proxy-"+h.Name, t.bin("zeitwork-edge-proxy"), merge(t.common(h.Region), map[string]string{
		"HTTPS_ADDR":           h.IP + ":443",
		"HTTP_ADDR":            h.IP + ":8083",
		"EDGE_ID":              "edge-" + strings.TrimPrefix(h.Name, Prefix),
		"EDGE_ADVERTISE_HTTPS": h.IP + ":443",
		"EDGE_ADVERTISE_HTTP":  h.IP + ":8083",
		"REGION":               r.Name,
		"SSL_CERT_PATH":        t.CA.WildcardCert,
		"SSL_KEY_PATH":         t.CA.WildcardKey,
		"TRUSTED_PROXIES":      r.Subnet, // the region's load balancers
		"STATE_DIR":            filepath.Join(t.cfg.StateDir, "edges", h.Name),
		"ACCESS_LOG":           "false",
	}, t.cfg.Env), "http://"+h.IP+":8083/health/live")
	if err := w.Edge.Start(ctx, time.Minute); err != nil {
		return err
	}
	var edges []string
	for _, e := range r.Of(RoleWorker) {
		edges = append(edges, e.IP)
	}
	w.LB = t.proc(h.Name, "load-balancer-"+h.Name, t.bin("zeitwork-load-balancer"), merge(t.common(h.Region), map[string]string{
		"LB_LISTENERS":          h.IP + ":8082=>443," + h.IP + ":8085=>8083",
		"LB_ADMIN_ADDR":         h.IP + ":8084",
		"LB_BACKENDS":           strings.Join(edges, ","),
		"LB_ALGORITHM":          "least-connections",
		"LB_PROXY_PROTOCOL":     "v2",
		"LB_HEALTH_INTERVAL":    "1s",
		"LB_HEALTH_FALL":        "2",
		"REGION":                r.Name,
		"LB_DISCOVERY_INTERVAL": "5s",
	}, t.cfg.Env), "http://"+h.IP+":8084/health/live")
	return w.LB.Start(ctx, time.Minute)
}

// Bootstrap creates an organisation with an owner and returns an API token.
func (t *Topology) Bootstrap(ctx context.Context, org, email string) (string, error) {
	h := t.Layout.Regions[0].Of(RoleOperator)[0]
	cmd := exec.CommandContext(ctx, t.bin("zeitwork-operator"), "bootstrap", org, email)
	cmd.Env = os.Environ()
	for k, v := range t.OperatorEnv(0, h.IP, t.MgmtDatabaseURL) {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fmt.Errorf("bootstrap: %v: %s", err, ee.Stderr)
		}
		return "", err
	}
	return strings.TrimSpace(string(out)), nil
}

// Stop stops every process, kills what is left inside the namespaces
// (microVMs, data planes) and removes the network.
func (t *Topology) Stop() error {
	var errs []error
	var procs []*devcluster.Proc
	for _, w := range t.Workers {
		procs = append(procs, w.LB, w.Edge)
	}
	stopAll := func(ps []*devcluster.Proc, timeout time.Duration) {
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, p := range ps {
			if p == nil {
				continue
			}
			wg.Go(func() {
				if err := p.Stop(timeout); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
	}
	stopAll(procs, 10*time.Second)
	procs = procs[:0]
	for _, w := range t.Workers {
		procs = append(procs, w.NodeAgent)
	}
	stopAll(procs, 20*time.Second)
	procs = procs[:0]
	for _, p := range t.Operators {
		procs = append(procs, p)
	}
	for _, p := range t.DNS {
		procs = append(procs, p)
	}
	stopAll(procs, 10*time.Second)
	if t.DB != nil {
		_ = t.DB.Signal(syscall.SIGINT) // fast shutdown
		select {
		case <-t.DB.Done():
		case <-time.After(20 * time.Second):
			t.DB.Kill()
		}
	}
	if t.Registry != nil {
		errs = append(errs, t.Registry.Close())
	}
	errs = append(errs, Cleanup())
	for _, w := range t.wires {
		w.close()
	}
	if t.lock != nil {
		t.lock.Close()
	}
	return errors.Join(errs...)
}
