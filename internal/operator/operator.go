// Package operator is Zeitwork's control plane (zeitwork-operator, :8080):
// the org-scoped public API, GitHub webhooks, the level-triggered
// deployment reconciler (placement, health-gated promotion, retention,
// failover), the route table that edge proxies follow, and the internal
// endpoints node agents, edge proxies and load balancers report to. All
// state is in PostgreSQL; any number of operators can serve the API, and
// one at a time (an advisory-lock leader) runs the background work.
package operator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/operator/agents"
	"github.com/zeitwork/zeitwork/internal/operator/builds"
	"github.com/zeitwork/zeitwork/internal/operator/domains"
	"github.com/zeitwork/zeitwork/internal/operator/monitoring"
	"github.com/zeitwork/zeitwork/internal/operator/reconcile"
	"github.com/zeitwork/zeitwork/internal/operator/routes"
	"github.com/zeitwork/zeitwork/internal/operator/secrets"
)

// Config is the operator's configuration.
type Config struct {
	Addr               string
	DatabaseURL        string
	ClusterToken       string
	EncryptionKey      string
	WebhookSecret      string
	AppsDomain         string
	EdgeHostname       string
	EdgeIPs            []string
	DNSResolver        string
	DeployTimeout      time.Duration
	Retention          time.Duration
	NodeDownAfter      time.Duration
	ReconcileEvery     time.Duration
	DomainRecheck      time.Duration
	OrphanScanEvery    time.Duration
	InsecureRegistries []string
	Drain              time.Duration
	AdminOrgs          []string
	// SDFile, when set, is the Prometheus file_sd targets file this
	// operator keeps listing every node agent (OBSERVABILITY_SD_FILE;
	// internal/operator/monitoring).
	SDFile string

	// Builds from source (internal/operator/builds).
	GitBaseURL     string        // GIT_BASE_URL: github_repo clones from GitBaseURL/owner/name.git
	BuildRegistry  string        // BUILD_REGISTRY: host[:port][/path] built images are pushed to
	BuildTimeout   time.Duration // BUILD_TIMEOUT
	BuildVCPUs     int           // BUILD_VCPUS, 0: the node agent's default
	BuildMemoryMiB int           // BUILD_MEMORY_MIB, 0: the node agent's default
	BuildDiskMiB   int           // BUILD_DISK_MIB, 0: the node agent's default
	MaxSourceBytes int64         // largest source upload; 0: builds.MaxSourceBytes (100 MiB)

	// BootstrapToken, when set, is ensured at start for BootstrapOrg
	// (owner BootstrapEmail): a known token for dev clusters and tests.
	BootstrapToken string
	BootstrapOrg   string
	BootstrapEmail string
}

// RequireBootstrapOwner records an error unless BOOTSTRAP_TOKEN comes with
// the organisation and owner it belongs to (the server ensures it at start;
// the bootstrap subcommand takes them as flags instead).
func (c Config) RequireBootstrapOwner(l *envconfig.Loader) {
	if c.BootstrapToken == "" {
		return
	}
	if c.BootstrapOrg == "" {
		l.Errorf("BOOTSTRAP_ORG", "is required with BOOTSTRAP_TOKEN (the organisation the token belongs to)")
	}
	if c.BootstrapEmail == "" {
		l.Errorf("BOOTSTRAP_EMAIL", "is required with BOOTSTRAP_TOKEN (the organisation's owner)")
	}
}

// LoadConfig reads the operator's environment.
func LoadConfig(l *envconfig.Loader) Config {
	c := Config{
		Addr:               l.Addr("PORT", ":8080"),
		DatabaseURL:        l.Required("DATABASE_URL", "the operator keeps cluster state in PostgreSQL"),
		ClusterToken:       l.Required("CLUSTER_TOKEN", "node agents, edge proxies and load balancers authenticate with it"),
		EncryptionKey:      l.Required("ENCRYPTION_KEY", "encrypts project environment variables; 32 random bytes, base64"),
		WebhookSecret:      l.String("GITHUB_WEBHOOK_SECRET", ""),
		AppsDomain:         strings.ToLower(l.String("APPS_DOMAIN", "zeitwork.app")),
		EdgeHostname:       strings.ToLower(l.String("EDGE_HOSTNAME", "edge.zeitwork.com")),
		EdgeIPs:            l.List("EDGE_IPS", nil),
		DNSResolver:        l.String("DNS_RESOLVER", ""),
		DeployTimeout:      l.Duration("DEPLOY_TIMEOUT", 120*time.Second),
		Retention:          l.Duration("RETENTION", 10*time.Minute),
		NodeDownAfter:      l.Duration("NODE_DOWN_AFTER", 30*time.Second),
		ReconcileEvery:     l.Duration("RECONCILE_INTERVAL", 2*time.Second),
		DomainRecheck:      l.Duration("DOMAIN_RECHECK_INTERVAL", time.Hour),
		OrphanScanEvery:    l.Duration("ORPHAN_SCAN_INTERVAL", time.Minute),
		InsecureRegistries: l.List("INSECURE_REGISTRIES", nil),
		Drain:              l.Duration("DRAIN_TIMEOUT", 20*time.Second),
		AdminOrgs:          l.List("ADMIN_ORGS", nil),
		GitBaseURL:         strings.TrimRight(l.String("GIT_BASE_URL", "https://github.com"), "/"),
		BuildRegistry:      strings.TrimRight(l.String("BUILD_REGISTRY", ""), "/"),
		BuildTimeout:       l.Duration("BUILD_TIMEOUT", 15*time.Minute),
		BuildVCPUs:         l.Int("BUILD_VCPUS", 0, 0, 64),
		BuildMemoryMiB:     l.Int("BUILD_MEMORY_MIB", 0, 0, build.MaxMemoryMiB),
		BuildDiskMiB:       l.Int("BUILD_DISK_MIB", 0, 0, build.MaxDiskMiB),
		SDFile:             l.String("OBSERVABILITY_SD_FILE", ""),
	}
	c.BootstrapToken = l.String("BOOTSTRAP_TOKEN", "")
	c.BootstrapOrg = l.String("BOOTSTRAP_ORG", "")
	c.BootstrapEmail = l.String("BOOTSTRAP_EMAIL", "")
	if c.BootstrapToken != "" {
		if len(c.BootstrapToken) < 20 {
			l.Errorf("BOOTSTRAP_TOKEN", "needs at least 20 characters")
		}
	}
	if a := l.String("LISTEN_ADDR", ""); a != "" {
		c.Addr = l.Addr("LISTEN_ADDR", a)
	}
	if c.EncryptionKey != "" {
		if _, err := secrets.NewSealer(c.EncryptionKey); err != nil {
			l.Errorf("ENCRYPTION_KEY", "%v", err)
		}
	}
	if c.DNSResolver != "" {
		if _, _, err := net.SplitHostPort(c.DNSResolver); err != nil {
			l.Errorf("DNS_RESOLVER", "%q is not host:port", c.DNSResolver)
		}
	}
	if u, err := url.Parse(c.GitBaseURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		l.Errorf("GIT_BASE_URL", "%q is not an http(s) URL like https://github.com", c.GitBaseURL)
	}
	if c.BuildRegistry != "" && !registryRE.MatchString(c.BuildRegistry) {
		l.Errorf("BUILD_REGISTRY", "%q is not host[:port][/path] (no scheme), e.g. 127.0.0.1:5005", c.BuildRegistry)
	}
	if c.BuildTimeout < time.Minute || c.BuildTimeout > build.MaxTimeoutS*time.Second {
		l.Errorf("BUILD_TIMEOUT", "%s is outside 1m..%s", c.BuildTimeout, build.MaxTimeoutS*time.Second)
	}
	if (c.BuildMemoryMiB != 0 && c.BuildMemoryMiB < 256) || (c.BuildDiskMiB != 0 && c.BuildDiskMiB < 256) {
		l.Errorf("BUILD_MEMORY_MIB", "BUILD_MEMORY_MIB and BUILD_DISK_MIB are 0 (the node agent's default) or at least 256")
	}
	for _, ip := range c.EdgeIPs {
		if net.ParseIP(ip) == nil {
			l.Errorf("EDGE_IPS", "%q is not an IP address", ip)
		}
	}
	return c
}

var registryRE = regexp.MustCompile(`^[a-zA-Z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*$`)

// Operator is one operator process.
type Operator struct {
	cfg    Config
	pool   *pgxpool.Pool
	log    *slog.Logger
	seal   *secrets.Sealer
	agents *agents.Client
	rec    *reconcile.Reconciler
	builds *builds.Scheduler
	verify *domains.Verifier
	m      *metrics

	routeTable *routes.Source
	kick       chan struct{} // wakes the reconciler
	uploads    chan struct{} // source uploads held in memory at once

	leading atomic.Bool
	lease   atomic.Pointer[lease] // the current leadership's; nil while not leading

	draining     context.Context // done once EndLongPolls is called
	endLongPolls context.CancelFunc
}

// EndLongPolls answers the route table long polls in progress at once and
// ends followed log streams: its HTTP server calls it when its graceful
// shutdown begins (http.Server.RegisterOnShutdown), which would otherwise
// wait up to a whole poll (30 s) for each of them.
func (o *Operator) EndLongPolls() { o.endLongPolls() }

// untilDrained returns ctx, cancelled as well once EndLongPolls is called.
func (o *Operator) untilDrained(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(o.draining, cancel)
	return ctx, func() { stop(); cancel() }
}

type metrics struct {
	requests    *prometheus.CounterVec
	latency     *prometheus.HistogramVec
	deployments *prometheus.CounterVec
	leader      prometheus.Gauge
	pauses      prometheus.Counter
	passes      *prometheus.HistogramVec
	webhooks    *prometheus.CounterVec
	routeBuilds prometheus.Counter
	build       *builds.Metrics
}

// New builds an operator on an open, migrated pool.
func New(cfg Config, pool *pgxpool.Pool, reg prometheus.Registerer, log *slog.Logger) (*Operator, error) {
	s, err := secrets.NewSealer(cfg.EncryptionKey)
	if err != nil {
		return nil, fmt.Errorf("ENCRYPTION_KEY: %w", err)
	}
	o := &Operator{cfg: cfg, pool: pool, log: log, seal: s, agents: agents.New(cfg.ClusterToken),
		kick: make(chan struct{}, 1), uploads: make(chan struct{}, 4),
		verify: domains.NewVerifier(cfg.DNSResolver, cfg.EdgeHostname, cfg.EdgeIPs)}
	o.draining, o.endLongPolls = context.WithCancel(context.Background())
	o.m = &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_operator_api_requests_total", Help: "API requests by status class."}, []string{"class"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "zeitwork_operator_api_request_duration_seconds",
			Help:    "API response time by route pattern and status class (long polls and log streams last as long as they wait).",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}}, []string{"route", "code"}),
		deployments: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_operator_deployments_total", Help: "Deployment transitions by status."}, []string{"status"}),
		leader:      prometheus.NewGauge(prometheus.GaugeOpts{Name: "zeitwork_operator_leader", Help: "1 while this operator runs the background work."}),
		pauses: prometheus.NewCounter(prometheus.CounterOpts{Name: "zeitwork_operator_leader_pauses_total",
			Help: "Times the leader paused its work because a check of its lock connection was overdue (3 s)."}),
		passes: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "zeitwork_operator_reconcile_duration_seconds",
			Help: "Duration of reconcile passes by result (ok, error, or paused: cut short by a pause of the leader).", Buckets: prometheus.ExponentialBuckets(0.001, 4, 8)}, []string{"result"}),
		webhooks:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_operator_webhook_deliveries_total", Help: "GitHub deliveries by result."}, []string{"result"}),
		routeBuilds: prometheus.NewCounter(prometheus.CounterOpts{Name: "zeitwork_operator_route_table_builds_total", Help: "Route tables built from the database (cache misses)."}),
	}
	o.m.build = builds.NewMetrics(o.m.deployments)
	if o.cfg.GitBaseURL == "" {
		o.cfg.GitBaseURL = "https://github.com"
	}
	if o.cfg.MaxSourceBytes <= 0 {
		o.cfg.MaxSourceBytes = builds.MaxSourceBytes
	}
	o.builds = builds.New(builds.Config{Registry: cfg.BuildRegistry, Timeout: cfg.BuildTimeout, VCPUs: cfg.BuildVCPUs,
		MemoryMiB: cfg.BuildMemoryMiB, DiskMiB: cfg.BuildDiskMiB, DeployTimeout: cfg.DeployTimeout}, pool, o.agents, s, log, o.m.build)
	o.routeTable = routes.New(pool, cfg.AppsDomain, o.m.routeBuilds)
	o.rec = reconcile.New(reconcile.Config{DeployTimeout: cfg.DeployTimeout, Retention: cfg.Retention, NodeDownAfter: cfg.NodeDownAfter,
		OrphanScanEvery: cfg.OrphanScanEvery, InsecureRegistries: cfg.InsecureRegistries}, pool, o.agents, s, log, o.m.deployments)
	if reg != nil {
		reg.MustRegister(o.m.requests, o.m.latency, o.m.deployments, o.m.leader, o.m.pauses, o.m.passes, o.m.webhooks, o.m.routeBuilds)
		reg.MustRegister(o.m.build.Collectors()...)
		reg.MustRegister(monitoring.NewCollector(pool, o.Leading, log))
		// Known label values start at 0, so rates and ratios exist before
		// the first event.
		for _, c := range []string{"2xx", "3xx", "4xx", "5xx"} {
			o.m.requests.WithLabelValues(c)
		}
		for _, st := range []string{"pending", "building", "preparing", "starting", "healthy", "active", "failed", "superseded"} {
			o.m.deployments.WithLabelValues(st)
		}
		for _, r := range []string{"succeeded", "failed", "canceled"} {
			o.m.build.Results.WithLabelValues(r)
		}
	}
	return o, nil
}

// Run listens for notifications and runs the background work (when this
// operator holds leadership) until ctx ends.
func (o *Operator) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Go(func() { o.listen(ctx) })
	wg.Go(func() { o.lead(ctx) })
	if o.cfg.SDFile != "" {
		t := &monitoring.Targets{Path: o.cfg.SDFile, Pool: o.pool, Log: o.log}
		wg.Go(func() { t.Run(ctx) })
	}
	wg.Wait()
	return nil
}

// Leading reports whether this operator currently runs the background work.
func (o *Operator) Leading() bool { return o.leading.Load() }

// listen turns NOTIFYs into in-process wake-ups, reconnecting on errors.
func (o *Operator) listen(ctx context.Context) {
	for ctx.Err() == nil {
		err := func() error {
			conn, err := o.pool.Acquire(ctx)
			if err != nil {
				return err
			}
			defer conn.Release()
			for _, ch := range []string{"zeitwork_routes", "zeitwork_reconcile"} {
				if _, err := conn.Exec(ctx, "LISTEN "+ch); err != nil {
					return err
				}
			}
			for {
				n, err := conn.Conn().WaitForNotification(ctx)
				if err != nil {
					return err
				}
				if n.Channel == "zeitwork_routes" {
					o.routeTable.Changed()
				}
				o.nudge()
			}
		}()
		if ctx.Err() != nil {
			return
		}
		o.log.Warn("notification listener failed; retrying", "err", err)
		o.routeTable.Changed() // waiters re-read the table
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (o *Operator) nudge() {
	select {
	case o.kick <- struct{}{}:
	default:
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

func newID() uuid.UUID { return uuid.Must(uuid.NewV7()) }

// tx runs fn in a transaction.
func (o *Operator) tx(ctx context.Context, fn func(pgx.Tx) error) error {
	return pgx.BeginFunc(ctx, o.pool, fn)
}

func isNoRows(err error) bool { return errors.Is(err, pgx.ErrNoRows) }
