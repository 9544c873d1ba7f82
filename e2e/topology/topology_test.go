// Package topology is the end-to-end test of Zeitwork's production layout
// on one machine (internal/topology): three regions of three operators and
// six workers as network namespaces, GeoDNS, one PostgreSQL; deployments
// across regions, operator failover, the loss of a whole region under load
// and PostgreSQL moving to another address.
package topology

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/devcluster"
	"github.com/zeitwork/zeitwork/internal/topology"
)

// binDir returns $ZEITWORK_BIN_DIR (make test builds it) or a fresh build.
func binDir(t *testing.T) string {
	if d := os.Getenv("ZEITWORK_BIN_DIR"); d != "" {
		if _, err := os.Stat(filepath.Join(d, "examples", "hello")); err == nil {
			return d
		}
	}
	d := t.TempDir()
	for _, b := range []string{"zeitwork-operator", "zeitwork-node-agent", "zeitwork-edge-proxy", "zeitwork-load-balancer", "zeitwork-dns", "zeitwork-init", "examples/hello"} {
		pkg := "./cmd/" + b
		if b == "examples/hello" {
			pkg = "./examples/hello"
		}
		cmd := exec.Command("go", "build", "-o", filepath.Join(d, b), pkg)
		cmd.Dir = "../.."
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, out)
		}
	}
	return d
}

// stateDir is $ZEITWORK_TOPOLOGY_STATE when set (emptied first and kept
// afterwards, to read every process's log) or a temporary directory.
func stateDir(t *testing.T) string {
	d := os.Getenv("ZEITWORK_TOPOLOGY_STATE")
	if d == "" {
		return t.TempDir()
	}
	d, err := filepath.Abs(d)
	if err == nil {
		err = os.RemoveAll(d)
	}
	if err == nil {
		err = os.MkdirAll(d, 0o755)
	}
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func requireRoot(t *testing.T) {
	if testing.Short() {
		t.Skip("the production topology takes minutes")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the topology test needs root on CI")
		}
		t.Skip("network namespaces need root")
	}
}

// TestProductionTopology runs the whole story on 3 regions × (3 operators
// + 6 workers).
func TestProductionTopology(t *testing.T) {
	requireRoot(t)
	bin := binDir(t)
	if !topology.HasDNS(bin) {
		t.Fatalf("zeitwork-dns missing in %s (make build)", bin)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	state := stateDir(t)
	start := time.Now()
	// A superseded deployment's microVMs stop 30 s after the next one is
	// active (RETENTION): the machine runs one deployment's 9 microVMs
	// between deploys, not every version's.
	topo, err := topology.Start(ctx, topology.Config{BinDir: bin, StateDir: state,
		Env: map[string]string{"DEPLOY_TIMEOUT": "180s", "NODE_DOWN_AFTER": "20s", "RETENTION": "30s"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			dumpLogs(t, state)
			for _, w := range topo.Workers {
				for _, p := range []*devcluster.Proc{w.NodeAgent, w.Edge, w.LB} {
					if p != nil && !p.Running() {
						b, _ := os.ReadFile(p.LogFile)
						t.Logf("--- %s exited; log tail:\n%s", p.Name, tailBytes(b, 3000))
					}
				}
			}
		}
		if err := topo.Stop(); err != nil {
			t.Logf("stop: %v", err)
		}
		if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), topology.Prefix) {
			t.Errorf("namespaces left after Stop:\n%s", out)
		}
	})
	t.Logf("topology up in %s", time.Since(start).Round(time.Millisecond))
	checkDatabaseTLS(t, ctx, topo)
	l := topo.Layout
	token, err := topo.Bootstrap(ctx, "demo", "dev@zeitwork.test")
	if err != nil {
		t.Fatal(err)
	}
	api := mustAPI(t, topo, token)
	v1, err := topo.PushSample(ctx, "v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := topology.CreateProject(ctx, api, "hello", 3); err != nil {
		t.Fatal(err)
	}

	// 1. A deployment lands 3 instances in each region on distinct workers.
	begin := time.Now()
	d, err := topology.Deploy(ctx, api, "hello", v1, 4*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("deployed to all regions in %s", time.Since(begin).Round(time.Millisecond))
	checkPlacement(t, ctx, api, topo, d.ID)
	prod := d.ProductionURL + "/"
	prodHost := strings.TrimPrefix(d.ProductionURL, "https://")
	if err := topo.EdgesServing(ctx, prodHost, "hello from v1", 30*time.Second); err != nil {
		t.Fatal(err)
	}

	// 2. Each region's client resolves the edge name (and the apps
	// wildcard) to its own region's load balancers and is served there.
	clients := make([]*topology.Client, len(l.Regions))
	for i, r := range l.Regions {
		if clients[i], err = topo.Client(i); err != nil {
			t.Fatal(err)
		}
		own := workerIPs(r)
		for _, name := range []string{topo.EdgeName(), strings.TrimPrefix(d.ProductionURL, "https://")} {
			ips, ttl, err := clients[i].Resolve(ctx, name)
			if err != nil || len(ips) == 0 || ttl > topo.DNSTTL() {
				t.Fatalf("%s resolves %s: %v ttl %s %v", r.Name, name, ips, ttl, err)
			}
			for _, ip := range ips {
				if !slices.Contains(own, ip) {
					t.Fatalf("%s's client got %s for %s: not one of its region's load balancers %v", r.Name, ip, name, own)
				}
			}
		}
		if err := clients[i].WaitGet(ctx, prod, "hello from v1", 15*time.Second); err != nil {
			t.Fatalf("%s's client: %v", r.Name, err)
		}
	}

	// 3. The firewall: a client reaches no operator, node agent or
	// database; a worker reaches the operators, an operator the database.
	a := l.Regions[0]
	for _, c := range []struct {
		from, to string
		ok       bool
	}{
		{a.Of(topology.RoleClient)[0].Name, a.Of(topology.RoleOperator)[0].IP + ":8080", false},
		{a.Of(topology.RoleClient)[0].Name, l.Regions[1].Of(topology.RoleWorker)[0].IP + ":8081", false},
		{a.Of(topology.RoleClient)[0].Name, l.DB.IP + ":5432", false},
		{a.Of(topology.RoleWorker)[0].Name, l.DB.IP + ":5432", false},
		{a.Of(topology.RoleClient)[0].Name, a.Of(topology.RoleWorker)[1].IP + ":443", false},
		{a.Of(topology.RoleWorker)[0].Name, l.Regions[2].Of(topology.RoleOperator)[1].IP + ":8080", true},
		{a.Of(topology.RoleOperator)[0].Name, l.Regions[1].Of(topology.RoleWorker)[2].IP + ":8081", true},
		{a.Of(topology.RoleOperator)[0].Name, l.DB.IP + ":5432", true},
		{a.Of(topology.RoleClient)[0].Name, a.Of(topology.RoleWorker)[1].IP + ":8082", true},
	} {
		dctx, dcancel := context.WithTimeout(ctx, 1500*time.Millisecond)
		conn, err := topology.DialIn(c.from)(dctx, "tcp", c.to)
		dcancel()
		if conn != nil {
			conn.Close()
		}
		if (err == nil) != c.ok {
			t.Errorf("firewall: %s → %s connected=%v, want %v (%v)", c.from, c.to, err == nil, c.ok, err)
		}
	}

	// 4. One leader across all nine operators; the leader's whole region
	// of operators fails and deployments go on.
	leader := oneLeader(t, ctx, topo, 15*time.Second)
	lr := regionOf(l, leader)
	t.Logf("leader %s (%s); killing every operator of %s", leader, l.Regions[lr].Name, l.Regions[lr].Name)
	for _, h := range l.Regions[lr].Of(topology.RoleOperator) {
		topo.Operators[h.Name].Kill()
	}
	next := oneLeader(t, ctx, topo, 20*time.Second)
	if regionOf(l, next) == lr {
		t.Fatalf("leader %s in the failed region", next)
	}
	api, err = topo.API(ctx, token)
	if err != nil {
		t.Fatal(err)
	}
	v2, _ := topo.PushSample(ctx, "v2")
	d2, err := topology.Deploy(ctx, api, "hello", v2, 4*time.Minute)
	if err != nil {
		t.Fatalf("deploy with %s's operators down: %v", l.Regions[lr].Name, err)
	}
	checkPlacement(t, ctx, api, topo, d2.ID)
	if err := topo.EdgesServing(ctx, prodHost, "hello from v2", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	for i, c := range clients {
		if err := c.WaitGet(ctx, prod, "hello from v2", 15*time.Second); err != nil {
			t.Fatalf("%s's client after v2: %v", l.Regions[i].Name, err)
		}
	}
	for _, h := range l.Regions[lr].Of(topology.RoleOperator) {
		if err := topo.StartOperator(ctx, h.Name); err != nil {
			t.Fatal(err)
		}
	}
	if got := oneLeader(t, ctx, topo, 20*time.Second); got != next {
		t.Fatalf("leadership moved from %s to %s when the operators came back", next, got)
	}

	// 5. The loss of a whole region (the leader's) under constant load
	// from the other regions' clients.
	lost := regionOf(l, next)
	var up []*topology.Client
	for i := range l.Regions {
		if i != lost {
			up = append(up, clients[i])
		}
	}
	asker := up[0] // asks for the lost region's clients (ECS)
	lostSubnet := l.Regions[lost].Subnet
	lostLBs := workerIPs(l.Regions[lost])
	// Before the cut the lost region's clients get its load balancers (a
	// health check that failed for a moment under load may have sent them
	// elsewhere: that is GeoDNS doing its work, so wait for the recovery).
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		ips, _, err := asker.ResolveFor(ctx, topo.EdgeName(), lostSubnet)
		if err == nil && subset(ips, lostLBs) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("before the cut, %s's clients get %v (%v)", l.Regions[lost].Name, ips, err)
		}
	}
	load := topology.StartLoad(ctx, up, prod, "hello from v2", 100*time.Millisecond, 900)
	time.Sleep(2 * time.Second)
	cutAt := time.Now()
	if err := topo.CutRegion(lost); err != nil {
		t.Fatal(err)
	}
	t.Logf("cut %s off", l.Regions[lost].Name)
	var failover time.Duration
	for failover == 0 {
		ips, _, err := asker.ResolveFor(ctx, topo.EdgeName(), lostSubnet)
		if err == nil && len(ips) > 0 && !overlaps(ips, lostLBs) {
			failover = time.Since(cutAt)
		} else if time.Since(cutAt) > 30*time.Second {
			t.Fatalf("GeoDNS still answers %v for the lost region 30 s after the cut (%v)", ips, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("GeoDNS dropped the lost region after %s (TTL %s)", failover.Round(time.Millisecond), topo.DNSTTL())
	if failover > topo.DNSTTL() {
		t.Errorf("GeoDNS took %s to stop answering with the lost region, more than its TTL %s", failover, topo.DNSTTL())
	}
	// A leader in a live region within seconds: the cut-off leader's
	// session (and advisory lock) ends on the server's keepalives. (The
	// cut-off operators are not asked: they cannot answer.)
	var newLeader string
	for newLeader == "" {
		if ls := topo.Leaders(ctx, lost); len(ls) == 1 {
			newLeader = ls[0]
		} else if len(ls) > 1 {
			t.Fatalf("two leaders: %v", ls)
		} else if time.Since(cutAt) > 30*time.Second {
			t.Fatalf("no leader in a live region 30 s after the cut (%v)", ls)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("%s took over %s after the cut", newLeader, time.Since(cutAt).Round(time.Millisecond))
	// The lost region's instances leave the route table once its nodes
	// miss their heartbeats (NODE_DOWN_AFTER) under the new leader.
	var unrouted time.Time
	var unroutedVersion string
	for unrouted.IsZero() {
		routed, version, err := topo.Routed(ctx, prodHost, lost)
		if err == nil && routed[l.Regions[lost].Name] == 0 && len(routed) == len(l.Regions)-1 {
			unrouted, unroutedVersion = time.Now(), version
		} else if time.Since(cutAt) > time.Minute {
			t.Fatalf("the lost region's instances still routed a minute after the cut: %v %v", routed, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("the lost region's instances left the route table %s after the cut", unrouted.Sub(cutAt).Round(time.Millisecond))
	// Every live edge serves the new table (by long poll; one polling an
	// operator of the lost region leaves it after 6 s of silence).
	if err := topo.EdgesHave(ctx, unroutedVersion, time.Minute, lost); err != nil {
		t.Error(err)
	}
	t.Logf("every live edge serves that table %s after the cut", time.Since(cutAt).Round(time.Millisecond))
	load.Stop()
	t.Logf("load while the region was being lost: %d requests from the live regions, %d failed", load.Total.Load(), load.Failed.Load())
	for _, f := range load.Failures() {
		t.Logf("  failed: %s from %s: %s", f.Start.Format("15:04:05.000"), f.Client, f.Err)
	}
	if load.Failed.Load() != 0 {
		t.Errorf("%d of %d requests from the live regions failed while the region was being lost", load.Failed.Load(), load.Total.Load())
	}
	if load.Total.Load() < 100 {
		t.Errorf("only %d requests from the live regions while the region was being lost", load.Total.Load())
	}
	// Without the region, once the platform has noticed: no failure.
	steady := topology.StartLoad(ctx, up, prod, "hello from v2", 100*time.Millisecond, 150)
	time.Sleep(15 * time.Second)
	steady.Stop()
	t.Logf("load without the lost region: %d requests, %d failed", steady.Total.Load(), steady.Failed.Load())
	if steady.Failed.Load() != 0 || steady.Total.Load() < 20 {
		t.Errorf("%d of %d requests from the live regions failed after the lost region left the route table: %v",
			steady.Failed.Load(), steady.Total.Load(), steady.Failures())
	}

	// The region returns: its instances are reconciled without duplicates.
	if err := topo.RestoreRegion(lost); err != nil {
		t.Fatal(err)
	}
	restored := time.Now()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		err := placementErr(ctx, api, topo, d2.ID)
		if err == nil {
			err = vmsMatch(ctx, api, topo, lost)
		}
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("region %s not reconciled 3 min after it returned: %v", l.Regions[lost].Name, err)
		}
		time.Sleep(time.Second)
	}
	t.Logf("%s reconciled %s after it returned", l.Regions[lost].Name, time.Since(restored).Round(time.Millisecond))
	if err := clients[lost].WaitGet(ctx, prod, "hello from v2", 15*time.Second); err != nil {
		t.Fatalf("the returned region's client: %v", err)
	}
	t.Logf("leader after the region returned: %s", oneLeader(t, ctx, topo, 20*time.Second))

	// 6. PostgreSQL moves to another address behind the same name: the
	// platform keeps serving its last routes, then resumes.
	load = topology.StartLoad(ctx, clients, prod, "hello from v2", 200*time.Millisecond, 400)
	time.Sleep(time.Second)
	if err := topo.MoveDB(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	load.Stop()
	t.Logf("PostgreSQL moved to %s: %d requests from every region meanwhile, %d failed", topo.DBHost.IP, load.Total.Load(), load.Failed.Load())
	if load.Failed.Load() != 0 {
		t.Errorf("%d of %d requests failed while PostgreSQL moved: %v", load.Failed.Load(), load.Total.Load(), load.Failures())
	}
	v3, _ := topo.PushSample(ctx, "v3")
	api, _ = topo.API(ctx, token)
	d3, err := topology.Deploy(ctx, api, "hello", v3, 4*time.Minute)
	if err != nil {
		t.Fatalf("deploy after PostgreSQL moved to %s: %v", topo.DBHost.IP, err)
	}
	checkPlacement(t, ctx, api, topo, d3.ID)
	t.Logf("deployed v3 through the moved database")
	if err := topo.EdgesServing(ctx, prodHost, "hello from v3", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := clients[0].WaitGet(ctx, prod, "hello from v3", 15*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("leader after PostgreSQL moved: %s", oneLeader(t, ctx, topo, 20*time.Second))
}

// checkDatabaseTLS: the database takes TLS connections only, and the
// operators' sslmode=verify-full (which they run with) refuses a server
// whose certificate another CA signed.
func checkDatabaseTLS(t *testing.T, ctx context.Context, topo *topology.Topology) {
	t.Helper()
	u, err := url.Parse(topo.MgmtDatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	if q := u.Query(); q.Get("sslmode") != "verify-full" || !strings.Contains(topo.DatabaseURL, "sslmode=verify-full") {
		t.Fatalf("the topology's database URLs do not verify the server: %s, %s", topo.MgmtDatabaseURL, topo.DatabaseURL)
	}
	other, err := devcluster.EnsureCA(t.TempDir(), "other.test")
	if err != nil {
		t.Fatal(err)
	}
	for what, mode := range map[string]string{
		"without TLS":                  "sslmode=disable",
		"verifying against another CA": "sslmode=verify-full&sslrootcert=" + url.QueryEscape(other.CertFile),
	} {
		v := *u
		v.RawQuery = mode
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		conn, err := pgx.Connect(cctx, v.String())
		cancel()
		if err == nil {
			conn.Close(ctx)
			t.Errorf("connected to the database %s", what)
		} else {
			t.Logf("connecting %s fails: %v", what, err)
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, topo.MgmtDatabaseURL)
	if err != nil {
		t.Fatalf("verify-full against the topology's CA: %v", err)
	}
	defer conn.Close(ctx)
	var ssl bool
	if err := conn.QueryRow(cctx, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").Scan(&ssl); err != nil || !ssl {
		t.Fatalf("the session is not encrypted (%v)", err)
	}
}

func mustAPI(t *testing.T, topo *topology.Topology, token string) *apiclient.Client {
	api, err := topo.API(t.Context(), token)
	if err != nil {
		t.Fatal(err)
	}
	return api
}

// oneLeader waits until exactly one operator leads and fails on two.
func oneLeader(t *testing.T, ctx context.Context, topo *topology.Topology, within time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ls := topo.Leaders(ctx)
		if len(ls) > 1 {
			t.Fatalf("two leaders at once: %v", ls)
		}
		if len(ls) == 1 {
			return ls[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("no leader within %s", within)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func regionOf(l *topology.Layout, host string) int {
	for i, r := range l.Regions {
		for _, h := range r.Hosts {
			if h.Name == host {
				return i
			}
		}
	}
	return -1
}

func workerIPs(r *topology.Region) []string {
	var ips []string
	for _, h := range r.Of(topology.RoleWorker) {
		ips = append(ips, h.IP)
	}
	return ips
}

func subset(a, b []string) bool {
	if len(a) == 0 {
		return false
	}
	for _, x := range a {
		if !slices.Contains(b, x) {
			return false
		}
	}
	return true
}

func overlaps(a, b []string) bool {
	for _, x := range a {
		if slices.Contains(b, x) {
			return true
		}
	}
	return false
}

// vmsMatch checks that region i's workers run exactly one microVM for
// each instance the database wants running there (any deployment of the
// project: superseded ones keep theirs for rollbacks) and nothing else.
func vmsMatch(ctx context.Context, api *apiclient.Client, topo *topology.Topology, i int) error {
	region := topo.Layout.Regions[i].Name
	ds, err := api.Deployments(ctx, "hello")
	if err != nil {
		return err
	}
	want := map[string]bool{}
	for _, d := range ds {
		full, err := api.Deployment(ctx, d.ID)
		if err != nil {
			return err
		}
		for _, in := range full.Instances {
			if in.Region == region && in.DesiredState == "running" {
				want[in.ID] = true
			}
		}
	}
	vms := topo.VMs(i)
	for id, n := range vms {
		if n != 1 || !want[id] {
			return fmt.Errorf("region %s runs %d microVM(s) for instance %s (wanted: %v)", region, n, id, want[id])
		}
	}
	for id := range want {
		if vms[id] == 0 {
			return fmt.Errorf("region %s runs no microVM for instance %s", region, id)
		}
	}
	return nil
}

func checkPlacement(t *testing.T, ctx context.Context, api *apiclient.Client, topo *topology.Topology, id string) {
	t.Helper()
	if err := placementErr(ctx, api, topo, id); err != nil {
		t.Fatal(err)
	}
}

// placementErr checks that deployment id runs exactly 3 healthy instances
// in every region, each on a distinct worker of that region.
func placementErr(ctx context.Context, api *apiclient.Client, topo *topology.Topology, id string) error {
	d, err := api.Deployment(ctx, id)
	if err != nil {
		return err
	}
	nodes, err := nodeRegions(ctx, api, topo)
	if err != nil {
		return err
	}
	per := map[string]map[string]bool{}
	for _, in := range d.Instances {
		if in.DesiredState != "running" {
			continue
		}
		if !in.Healthy {
			return fmt.Errorf("instance %s in %s not healthy (%s)", in.ID, in.Region, in.State)
		}
		if nodes[in.NodeID] != in.Region {
			return fmt.Errorf("instance %s of region %s on node %s of region %q", in.ID, in.Region, in.NodeID, nodes[in.NodeID])
		}
		if per[in.Region] == nil {
			per[in.Region] = map[string]bool{}
		}
		if per[in.Region][in.NodeID] {
			return fmt.Errorf("two instances of %s on node %s", id, in.NodeID)
		}
		per[in.Region][in.NodeID] = true
	}
	for _, r := range topo.Layout.Regions {
		if len(per[r.Name]) != 3 {
			return fmt.Errorf("region %s runs %d instances of %s, want 3 on distinct workers", r.Name, len(per[r.Name]), id)
		}
	}
	return nil
}

// nodeRegions maps node ids to regions, checking that each node is the
// worker its address says.
func nodeRegions(ctx context.Context, api *apiclient.Client, topo *topology.Topology) (map[string]string, error) {
	var nodes struct {
		Nodes []apiclient.Node `json:"nodes"`
	}
	if err := api.Do(ctx, "GET", "/api/v1/nodes", nil, &nodes); err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, n := range nodes.Nodes {
		host, _, _ := net.SplitHostPort(strings.TrimPrefix(n.Address, "http://"))
		for _, r := range topo.Layout.Regions {
			if slices.Contains(workerIPs(r), host) && r.Name == n.Region {
				out[n.ID] = n.Region
			}
		}
	}
	return out, nil
}

func tailBytes(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

func dumpLogs(t *testing.T, state string) {
	var logs []string
	for _, glob := range []string{"*-op*.log", "dns-*.log", "postgres-*.log", "node-agent-*-w1.log", "edge-proxy-*-w1.log"} {
		m, _ := filepath.Glob(filepath.Join(state, "logs", glob))
		logs = append(logs, m...)
	}
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		if len(b) > 1500 {
			b = b[len(b)-1500:]
		}
		t.Logf("--- %s (tail):\n%s", filepath.Base(l), b)
	}
}
