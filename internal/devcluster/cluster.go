// Package devcluster runs the whole Zeitwork platform on one machine as
// real, separate processes on loopback: a private PostgreSQL, an OCI
// registry with the bundled sample app, the operator, and per region a load
// balancer, an edge proxy and node agents (QEMU microVMs). `make dev` and the
// end-to-end suite both use it.
//
// Regions get their own loopback addresses (region i listens on 127.0.i.x)
// so every process keeps its standard port, as in production.
package devcluster

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/zeitwork/zeitwork/internal/dataplane"
	"github.com/zeitwork/zeitwork/internal/embeddedpg"
)

// Config describes a cluster.
type Config struct {
	BinDir         string   // where the six binaries live
	StateDir       string   // everything the cluster writes; reused on restart
	Regions        []string // default ["local"]
	NodesPerRegion int      // node agents per region; default 1
	AppsDomain     string   // default zeitwork.test
	DatabaseURL    string   // empty: start an embedded PostgreSQL in StateDir
	// FirstIP is the loopback address of region 0's services; region i uses
	// the same address with its third octet increased by i. Default 127.0.0.1
	// for one region, 127.0.1.1 for several.
	FirstIP string
	// Env adds or overrides variables of every service (e.g. RETENTION).
	Env map[string]string
	// EdgeEnv adds variables of the edge proxies only.
	EdgeEnv map[string]string
	// RegistryAddr is where the local OCI registry listens (default a
	// free loopback port).
	RegistryAddr string
	// KernelDir caches the guest kernel (shared by all node agents).
	KernelDir string
	// Distribution runs the platform registry as the distribution
	// registry process (Debian's docker-registry) instead of in process.
	Distribution bool
	// GitBaseURL is where projects' GitHub repositories are fetched from
	// (GIT_BASE_URL; tests point it at a local git server).
	GitBaseURL string
}

// Region is one running region.
type Region struct {
	Name       string
	IP         string
	LB         *Proc
	Edge       *Proc
	NodeAgents []*Proc
}

// Cluster is a running platform.
type Cluster struct {
	cfg           Config
	DB            *embeddedpg.Server
	DatabaseURL   string
	Registry      *Registry
	CA            *CA
	Operator      *Proc
	OperatorURL   string
	Regions       []*Region
	ClusterToken  string
	WebhookSecret string
	encKey        string
	operatorAddr  string
}

func (c *Config) defaults() {
	if len(c.Regions) == 0 {
		c.Regions = []string{"local"}
	}
	if c.NodesPerRegion == 0 {
		c.NodesPerRegion = 1
	}
	if c.AppsDomain == "" {
		c.AppsDomain = "zeitwork.test"
	}
	if c.RegistryAddr == "" {
		c.RegistryAddr = "127.0.0.1:0"
	}
	if c.KernelDir == "" {
		c.KernelDir = "/var/cache/zeitwork/kernel"
	}
	if c.FirstIP == "" {
		c.FirstIP = "127.0.0.1"
		if len(c.Regions) > 1 {
			c.FirstIP = "127.0.1.1"
		}
	}
}

// secret returns a persistent random secret stored in StateDir/name.
func secret(dir, name string, n int, enc func([]byte) string) (string, error) {
	p := filepath.Join(dir, name)
	if b, err := os.ReadFile(p); err == nil && len(b) > 0 {
		return strings.TrimSpace(string(b)), nil
	}
	buf := make([]byte, n)
	_, _ = rand.Read(buf)
	s := enc(buf)
	if err := os.WriteFile(p, []byte(s+"\n"), 0o600); err != nil {
		return "", err
	}
	return s, nil
}

func regionIP(first string, i, host int) string {
	var a, b, c, d int
	_, _ = fmt.Sscanf(first, "%d.%d.%d.%d", &a, &b, &c, &d)
	return fmt.Sprintf("%d.%d.%d.%d", a, b, c+i, d+host)
}

func (c *Cluster) bin(name string) string { return filepath.Join(c.cfg.BinDir, name) }

func (c *Cluster) logFile(name string) string {
	return filepath.Join(c.cfg.StateDir, "logs", name+".log")
}

// Start brings the platform up. On error everything started is stopped.
func Start(ctx context.Context, cfg Config) (_ *Cluster, err error) {
	cfg.defaults()
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return nil, err
	}
	for _, b := range []string{"zeitwork-operator", "zeitwork-node-agent", "zeitwork-edge-proxy", "zeitwork-load-balancer", "zeitwork-init"} {
		if _, err := exec.LookPath(filepath.Join(cfg.BinDir, b)); err != nil {
			return nil, fmt.Errorf("missing binary %s in %s (run make build): %w", b, cfg.BinDir, err)
		}
	}
	c := &Cluster{cfg: cfg}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	if c.ClusterToken, err = secret(cfg.StateDir, "cluster-token", 24, hex.EncodeToString); err != nil {
		return nil, err
	}
	if c.WebhookSecret, err = secret(cfg.StateDir, "webhook-secret", 24, hex.EncodeToString); err != nil {
		return nil, err
	}
	if c.CA, err = EnsureCA(filepath.Join(cfg.StateDir, "ca"), cfg.AppsDomain); err != nil {
		return nil, err
	}
	c.DatabaseURL = cfg.DatabaseURL
	if c.DatabaseURL == "" {
		c.DB, err = embeddedpg.Start(ctx, embeddedpg.Config{DataDir: filepath.Join(cfg.StateDir, "postgres", "data")})
		if err != nil {
			return nil, err
		}
		if err := c.DB.EnsureDatabase(ctx, "zeitwork"); err != nil {
			return nil, err
		}
		c.DatabaseURL = c.DB.URL("zeitwork")
	}
	if cfg.Distribution {
		c.Registry, err = StartDistribution(ctx, cfg.RegistryAddr, filepath.Join(cfg.StateDir, "registry"))
	} else {
		c.Registry, err = StartRegistry(cfg.RegistryAddr)
	}
	if err != nil {
		return nil, err
	}
	encKey, err := secret(cfg.StateDir, "encryption-key", 32, base64.StdEncoding.EncodeToString)
	if err != nil {
		return nil, err
	}
	if err := c.startOperator(ctx, encKey); err != nil {
		return nil, err
	}
	for i, name := range cfg.Regions {
		r := &Region{Name: name, IP: regionIP(cfg.FirstIP, i, 0)}
		c.Regions = append(c.Regions, r)
		if err := c.startRegion(ctx, i, r); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (c *Cluster) common() map[string]string {
	return map[string]string{
		"LOG_LEVEL":     "info",
		"ENVIRONMENT":   "development",
		"CLUSTER_TOKEN": c.ClusterToken,
		"APPS_DOMAIN":   c.cfg.AppsDomain,
		"OPERATOR_URL":  c.OperatorURL,
	}
}

func merge(dst map[string]string, srcs ...map[string]string) map[string]string {
	for _, s := range srcs {
		for k, v := range s {
			dst[k] = v
		}
	}
	return dst
}

// OperatorEnv is the operator's environment (also used to run its
// subcommands, e.g. bootstrap).
func (c *Cluster) OperatorEnv() map[string]string {
	git := map[string]string{}
	if c.cfg.GitBaseURL != "" {
		git["GIT_BASE_URL"] = c.cfg.GitBaseURL
	}
	return merge(c.common(), git, map[string]string{
		"LISTEN_ADDR":           c.operatorAddr,
		"DATABASE_URL":          c.DatabaseURL,
		"ENCRYPTION_KEY":        c.encKey,
		"EDGE_HOSTNAME":         "edge." + c.cfg.AppsDomain,
		"GITHUB_WEBHOOK_SECRET": c.WebhookSecret,
		"INSECURE_REGISTRIES":   c.Registry.Addr,
		"RECONCILE_INTERVAL":    "500ms",
		"BUILD_REGISTRY":        c.Registry.Addr,
	}, c.cfg.Env)
}

func (c *Cluster) startOperator(ctx context.Context, encKey string) error {
	ip := c.cfg.FirstIP
	if len(c.cfg.Regions) > 1 {
		ip = "127.0.0.1"
	}
	c.encKey = encKey
	c.operatorAddr = ip + ":8080"
	c.OperatorURL = "http://" + c.operatorAddr
	c.Operator = &Proc{Name: "operator", Path: c.bin("zeitwork-operator"), LogFile: c.logFile("operator"),
		Health: c.OperatorURL + "/health/live", Env: c.OperatorEnv()}
	return c.Operator.Start(ctx, 2*time.Minute)
}

// NodeAgentEnv is the environment of node agent n of region i.
func (c *Cluster) nodeAgent(i int, r *Region, n int) *Proc {
	ip := regionIP(c.cfg.FirstIP, i, 10+n)
	name := fmt.Sprintf("node-agent-%s-%d", r.Name, n)
	return &Proc{
		Name: name, Path: c.bin("zeitwork-node-agent"), LogFile: c.logFile(name), KeepGroup: true,
		Health: "http://" + ip + ":8081/health/live",
		Env: merge(c.common(), map[string]string{
			"LISTEN_ADDR":         ip + ":8081",
			"NODE_ADVERTISE_ADDR": "http://" + ip + ":8081",
			"REGION":              r.Name,
			"VM_WORK_DIR":         filepath.Join(c.cfg.StateDir, "nodes", name),
			"VM_SUBNET":           fmt.Sprintf("10.%d.%d.0/24", 200+i, n),
			"KERNEL_DIR":          c.cfg.KernelDir,
			"INSECURE_REGISTRIES": c.Registry.Addr,
			"HEARTBEAT_INTERVAL":  "1s",
			"BUILD_IMAGE_DIR":     filepath.Join(filepath.Dir(c.cfg.KernelDir), "builder"),
			"BUILD_MEMORY_MIB":    "1024",
			"BUILD_DISK_MIB":      "4096",
		}, c.cfg.Env),
	}
}

func (c *Cluster) startRegion(ctx context.Context, i int, r *Region) error {
	for n := range c.cfg.NodesPerRegion {
		p := c.nodeAgent(i, r, n)
		r.NodeAgents = append(r.NodeAgents, p)
		if err := p.Start(ctx, 5*time.Minute); err != nil {
			return err
		}
	}
	r.Edge = &Proc{
		Name: "edge-proxy-" + r.Name, Path: c.bin("zeitwork-edge-proxy"), LogFile: c.logFile("edge-proxy-" + r.Name),
		Health: "http://" + r.IP + ":8083/health/live",
		Env: merge(c.common(), map[string]string{
			"HTTPS_ADDR":           r.IP + ":443",
			"HTTP_ADDR":            r.IP + ":8083",
			"EDGE_ID":              "edge-" + r.Name,
			"EDGE_ADVERTISE_HTTPS": r.IP + ":443",
			"EDGE_ADVERTISE_HTTP":  r.IP + ":8083",
			"REGION":               r.Name,
			"SSL_CERT_PATH":        c.CA.WildcardCert,
			"SSL_KEY_PATH":         c.CA.WildcardKey,
			"TRUSTED_PROXIES":      "127.0.0.0/8", // the LB dials from the loopback primary address
			"STATE_DIR":            filepath.Join(c.cfg.StateDir, "edge-"+r.Name),
			"DATABASE_URL":         c.DatabaseURL, // ACME storage, when ACME is on
			"ACCESS_LOG":           "false",
		}, c.cfg.EdgeEnv, c.cfg.Env),
	}
	if err := r.Edge.Start(ctx, time.Minute); err != nil {
		return err
	}
	r.LB = &Proc{
		Name: "load-balancer-" + r.Name, Path: c.bin("zeitwork-load-balancer"), LogFile: c.logFile("load-balancer-" + r.Name),
		Health: "http://" + r.IP + ":8084/health/live",
		Env: merge(c.common(), map[string]string{
			"LB_LISTENERS":      r.IP + ":8082=>443," + r.IP + ":8085=>8083",
			"LB_ADMIN_ADDR":     r.IP + ":8084",
			"LB_BACKENDS":       r.IP,
			"LB_ALGORITHM":      "least-connections",
			"LB_PROXY_PROTOCOL": "v2",
			"REGION":            r.Name,
		}, c.cfg.Env),
	}
	return r.LB.Start(ctx, time.Minute)
}

// RestartNodeAgent starts a stopped or killed node agent again.
func (c *Cluster) RestartNodeAgent(ctx context.Context, region, n int) error {
	r := c.Regions[region]
	p := c.nodeAgent(region, r, n)
	r.NodeAgents[n] = p
	return p.Start(ctx, 5*time.Minute)
}

// Bootstrap creates an organisation with an owner and returns an API token.
func (c *Cluster) Bootstrap(ctx context.Context, org, email string) (string, error) {
	cmd := exec.CommandContext(ctx, c.bin("zeitwork-operator"), "bootstrap", org, email)
	cmd.Env = os.Environ()
	for k, v := range c.OperatorEnv() {
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

// Stop stops every process (load balancers first, the database last). VMs
// are stopped through their agents' instances being deleted by the caller
// when wanted; a dev cluster keeps them for the next run.
func (c *Cluster) Stop() error {
	var errs []error
	for _, r := range c.Regions {
		for _, p := range []*Proc{r.LB, r.Edge} {
			if p != nil {
				errs = append(errs, p.Stop(30*time.Second))
			}
		}
	}
	for _, r := range c.Regions {
		for _, p := range r.NodeAgents {
			errs = append(errs, p.Stop(60*time.Second))
		}
	}
	if c.Operator != nil {
		errs = append(errs, c.Operator.Stop(30*time.Second))
	}
	if c.Registry != nil {
		errs = append(errs, c.Registry.Close())
	}
	if c.DB != nil {
		errs = append(errs, c.DB.Close())
	}
	return errors.Join(errs...)
}

// StopVMs kills what the cluster's node agents leave running on purpose
// when they stop: their data plane processes, their microVMs and the VMs'
// taps.
func (c *Cluster) StopVMs() {
	dirs, _ := filepath.Glob(filepath.Join(c.cfg.StateDir, "nodes", "*"))
	for _, d := range dirs {
		_ = dataplane.Stop(d, 2*time.Second)
	}
	pids, _ := filepath.Glob(filepath.Join(c.cfg.StateDir, "nodes", "*", "instances", "*", "vmm.pid"))
	for _, p := range pids {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(string(b), &pid); err == nil && pid > 1 {
			if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && strings.Contains(string(cmdline), filepath.Dir(p)) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	leases, _ := filepath.Glob(filepath.Join(c.cfg.StateDir, "nodes", "*", "net", "*.json"))
	for _, l := range leases {
		b, err := os.ReadFile(l)
		if err != nil {
			continue
		}
		var lease struct {
			Tap string `json:"tap"`
		}
		if json.Unmarshal(b, &lease) == nil && lease.Tap != "" {
			_ = exec.Command("ip", "link", "del", lease.Tap).Run()
		}
	}
}

// RestartDB starts the embedded PostgreSQL again after DB.Stop.
func (c *Cluster) RestartDB(ctx context.Context) error {
	if c.DB == nil {
		return errors.New("no embedded database")
	}
	db, err := embeddedpg.Start(ctx, embeddedpg.Config{DataDir: filepath.Join(c.cfg.StateDir, "postgres", "data"), Port: c.DB.Port()})
	if err != nil {
		return err
	}
	c.DB = db
	return nil
}

// StateDir is where the cluster keeps its state.
func (c *Cluster) StateDir() string { return c.cfg.StateDir }
