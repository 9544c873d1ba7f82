// Command topology benchmarks the production layout on one machine
// (internal/topology: 3 regions × (3 operators + 6 workers), GeoDNS,
// PostgreSQL, delayed links between regions): the time to deploy the
// sample app with 3 instances in every region, the failed requests and the
// GeoDNS failover time when a whole region is lost under load; and, in the
// same run, the same deploy on the one-host `make dev` layout
// (internal/devcluster), as a ratio.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/zeitwork/zeitwork/bench/benchdoc"
	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/devcluster"
	"github.com/zeitwork/zeitwork/internal/topology"
)

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

// retention (both layouts): a superseded deployment's microVMs stop 30 s
// after the next one is active, so each deploy boots beside one running
// version, not every earlier one.
const retention = "30s"

func run() error {
	rounds := flag.Int("rounds", 3, "deploys per layout")
	binDir := flag.String("bin", "bin", "built binaries")
	flag.Parse()
	bin, _ := filepath.Abs(*binDir)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	state, err := os.MkdirTemp("", "bench-topology-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(state)

	log.Printf("topology: starting 3 regions × (3 operators + 6 workers)")
	topo, err := topology.Start(ctx, topology.Config{BinDir: bin, StateDir: filepath.Join(state, "topology"),
		Env: map[string]string{"DEPLOY_TIMEOUT": "180s", "NODE_DOWN_AFTER": "20s", "RETENTION": retention}})
	if err != nil {
		return err
	}
	topoDeploys, lossFailed, lossTotal, failover, unrouted, synced, capacity, err := benchTopology(ctx, topo, *rounds)
	if serr := topo.Stop(); serr != nil {
		log.Printf("stop: %v", serr) // everything is killed and removed regardless
	}
	if err != nil {
		return err
	}

	log.Printf("dev layout: one host, one region, one node agent")
	devDeploys, err := benchDev(ctx, bin, filepath.Join(state, "dev"), *rounds)
	if err != nil {
		return err
	}
	tp, dp := p50(topoDeploys), p50(devDeploys)
	var sb strings.Builder
	fmt.Fprintf(&sb, "Production layout on one machine (`make bench-topology`): 3 regions × (3 operators + 6 workers) as network namespaces, links to the core delayed 10/15/30 ms one way, GeoDNS TTL %s, one PostgreSQL; the sample app deployed %d times with 3 instances in every region (9 microVMs, QEMU TCG). The same deploy on the one-host `make dev` layout (one region, one node agent, 3 instances) in the same run.\n\n", topo.DNSTTL(), *rounds)
	fmt.Fprintf(&sb, "| | topology | make dev layout | ratio |\n|---|---|---|---|\n")
	fmt.Fprintf(&sb, "| deploy p50 (s) | %.1f | %.1f | %.2f |\n\n", tp.Seconds(), dp.Seconds(), tp.Seconds()/dp.Seconds())
	fmt.Fprintf(&sb, "Loss of a whole region (ap-south: its link to the core cut) under constant load from the other two regions' clients (10 req/s each at most, resolving through GeoDNS, a new connection per request), from 2 s before the cut until every live edge proxy had a route table without the lost region (its instances left the table %.1f s after the cut — nodes are marked down after 20 s without heartbeat — and the last edge took it %.1f s after the cut): %d of %d requests failed; GeoDNS stopped answering with the lost region %.1f s after the cut. Edges prefer their own region's instances and retry a try that times out on another node (ADR 0503).\n\n", unrouted.Seconds(), synced.Seconds(), lossFailed, lossTotal, failover.Seconds())
	fmt.Fprintf(&sb, "Memory: %s.\n", capacity)
	fmt.Print(sb.String())
	if err := benchdoc.Write("topology", sb.String()); err != nil {
		log.Printf("cannot record results: %v", err)
	}
	fmt.Printf("bench-topology: deploy_all_regions_p50_s=%.1f region_loss_failed_requests=%d dns_failover_s=%.1f dev_deploy_p50_s=%.1f deploy_ratio_vs_dev=%.2f accel=tcg\n",
		tp.Seconds(), lossFailed, failover.Seconds(), dp.Seconds(), tp.Seconds()/dp.Seconds())
	return nil
}

func benchTopology(ctx context.Context, topo *topology.Topology, rounds int) (deploys []time.Duration, failed, total int64, failover, unrouted, synced time.Duration, capacity string, err error) {
	token, err := topo.Bootstrap(ctx, "demo", "bench@zeitwork.test")
	if err != nil {
		return
	}
	api, err := topo.API(ctx, token)
	if err != nil {
		return
	}
	if err = topology.CreateProject(ctx, api, "hello", 3); err != nil {
		return
	}
	var prod string
	for i := range rounds {
		tag := fmt.Sprintf("r%d", i)
		ref, perr := topo.PushSample(ctx, tag)
		if perr != nil {
			return nil, 0, 0, 0, 0, 0, "", perr
		}
		start := time.Now()
		d, derr := topology.Deploy(ctx, api, "hello", ref, 5*time.Minute)
		if derr != nil {
			return nil, 0, 0, 0, 0, 0, "", derr
		}
		deploys = append(deploys, time.Since(start))
		log.Printf("topology: deploy %d: %s", i+1, deploys[i].Round(time.Millisecond))
		prod = d.ProductionURL + "/"
	}
	capacity = topo.Capacity()
	want := fmt.Sprintf("hello from r%d", rounds-1)
	l := topo.Layout
	lost := len(l.Regions) - 1
	var clients []*topology.Client
	for i := range l.Regions {
		c, cerr := topo.Client(i)
		if cerr != nil {
			return nil, 0, 0, 0, 0, 0, "", cerr
		}
		if err = c.WaitGet(ctx, prod, want, 15*time.Second); err != nil {
			return
		}
		if i != lost {
			clients = append(clients, c)
		}
	}
	var lostLBs []string
	for _, h := range l.Regions[lost].Of(topology.RoleWorker) {
		lostLBs = append(lostLBs, h.IP)
	}
	load := topology.StartLoad(ctx, clients, prod, want, 100*time.Millisecond, 600)
	time.Sleep(2 * time.Second)
	cut := time.Now()
	if err = topo.CutRegion(lost); err != nil {
		load.Stop()
		return
	}
	for failover == 0 && time.Since(cut) < 60*time.Second {
		ips, _, rerr := clients[0].ResolveFor(ctx, topo.EdgeName(), l.Regions[lost].Subnet)
		if rerr == nil && len(ips) > 0 && !slices.ContainsFunc(ips, func(ip string) bool { return slices.Contains(lostLBs, ip) }) {
			failover = time.Since(cut)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Until the lost region's instances left the route table and every
	// live edge took the new table.
	host := strings.TrimSuffix(strings.TrimPrefix(prod, "https://"), "/")
	var version string
	for time.Since(cut) < 2*time.Minute {
		routed, v, rerr := topo.Routed(ctx, host, lost)
		if rerr == nil && routed[l.Regions[lost].Name] == 0 && len(routed) > 0 {
			unrouted, version = time.Since(cut), v
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if serr := topo.EdgesHave(ctx, version, 2*time.Minute, lost); serr != nil {
		log.Printf("edges: %v", serr)
	}
	synced = time.Since(cut)
	load.Stop()
	if load.Failed.Load() > 0 {
		log.Printf("failed requests: %v", load.Failures())
	}
	err = topo.RestoreRegion(lost)
	return deploys, load.Failed.Load(), load.Total.Load(), failover, unrouted, synced, capacity, err
}

func benchDev(ctx context.Context, bin, state string, rounds int) ([]time.Duration, error) {
	c, err := devcluster.Start(ctx, devcluster.Config{BinDir: bin, StateDir: state, FirstIP: "127.0.9.1",
		Env: map[string]string{"DEPLOY_TIMEOUT": "180s", "VM_SUBNET": "10.250.200.0/24", "RETENTION": retention}})
	if err != nil {
		return nil, err
	}
	defer func() {
		_ = c.Stop()
		c.StopVMs()
	}()
	token, err := c.Bootstrap(ctx, "demo", "bench@zeitwork.test")
	if err != nil {
		return nil, err
	}
	api := apiclient.New(c.OperatorURL, token)
	if err := topology.CreateProject(ctx, api, "hello", 3); err != nil {
		return nil, err
	}
	var out []time.Duration
	for i := range rounds {
		ref, err := c.Registry.PushSample(ctx, "demo/hello", fmt.Sprintf("d%d", i), devcluster.SampleImage{
			Binary: filepath.Join(bin, "examples", "hello"), Env: map[string]string{"APP_VERSION": fmt.Sprintf("d%d", i)}, User: "1000:1000"})
		if err != nil {
			return nil, err
		}
		start := time.Now()
		if _, err := topology.Deploy(ctx, api, "hello", ref, 5*time.Minute); err != nil {
			return nil, err
		}
		out = append(out, time.Since(start))
		log.Printf("dev: deploy %d: %s", i+1, out[i].Round(time.Millisecond))
	}
	return out, nil
}

func p50(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
