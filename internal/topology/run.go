package topology

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

// Run is `make topology`: it starts the layout, deploys the sample app
// with three instances per region, prints how to reach everything and
// what the machine holds, and tears it all down when ctx ends.
func Run(ctx context.Context, args []string, log *slog.Logger) error {
	fs := flag.NewFlagSet("topology", flag.ContinueOnError)
	state := fs.String("state", ".dev/topology", "state directory (wiped on start)")
	binDir := fs.String("bin", "bin", "directory of the built binaries")
	perRegion := fs.Int("instances", 3, "instances of the sample app per region")
	if err := fs.Parse(args); err != nil {
		return err
	}
	abs, _ := filepath.Abs(*state)
	bin, _ := filepath.Abs(*binDir)
	say := func(format string, a ...any) { fmt.Fprintf(os.Stderr, "==> "+format+"\n", a...) }
	say("building 3 regions × (3 operators + 6 workers), GeoDNS, PostgreSQL as network namespaces %s* (state in %s)", Prefix, abs)
	start := time.Now()
	t, err := Start(ctx, Config{BinDir: bin, StateDir: abs, Env: map[string]string{"NODE_DOWN_AFTER": "20s"}})
	if err != nil {
		return err
	}
	defer func() {
		say("stopping: processes, microVMs, namespaces")
		if err := t.Stop(); err != nil {
			log.Warn("stop", "err", err)
		}
	}()
	say("platform up in %s", time.Since(start).Round(time.Second))
	token, err := t.Bootstrap(ctx, "demo", "dev@zeitwork.test")
	if err != nil {
		return err
	}
	api := apiclient.New(t.OperatorURL(), token)
	ref, err := t.PushSample(ctx, "v1")
	if err != nil {
		return err
	}
	if err := CreateProject(ctx, api, "hello", *perRegion); err != nil {
		return err
	}
	say("deploying the sample app, %d microVMs per region (TCG: a few seconds per boot)", *perRegion)
	d, err := Deploy(ctx, api, "hello", ref, 10*time.Minute)
	if err != nil {
		return err
	}
	cap := t.Capacity()
	host := strings.TrimPrefix(d.ProductionURL, "https://")
	fmt.Printf(`
Zeitwork's production layout is running (deployed in %s).

  operator API     %s   (token: %s; every operator: 10.250.<1..3>.11-13:8080)
  regions          %s
  GeoDNS           10.250.<1..3>.53:53, zone %s (edge name %s, db.internal.%s)
  PostgreSQL       %s
  CA               %s
  production URL   %s

From a region's client namespace (resolves through its region's GeoDNS):
  ip netns exec %sa-cl curl --cacert %s https://%s:8082/
  ip netns exec %sb-cl getent ahostsv4 %s
  ip netns exec %sc-cl curl http://%s:8085/

Hosts: ip netns list | grep %s (every host is a namespace; logs in %s/logs).
Capacity: %s

Ctrl-C stops everything.
`, time.Since(start).Round(time.Second), t.OperatorURL(), token, regionNames(t.Layout), t.cfg.Zone, t.EdgeName(), t.cfg.Zone,
		t.MgmtDatabaseURL, t.CA.CertFile, d.ProductionURL,
		Prefix, t.CA.CertFile, host, Prefix, t.EdgeName(), Prefix, host,
		Prefix, abs, cap)
	<-ctx.Done()
	return nil
}

func regionNames(l *Layout) string {
	var s []string
	for _, r := range l.Regions {
		s = append(s, fmt.Sprintf("%s (%s, link +%s)", r.Name, r.Subnet, r.Delay))
	}
	return strings.Join(s, ", ")
}

// Capacity measures the layout's memory: the resident memory of every
// process in its namespaces, of its microVMs alone, and how many more
// microVMs of the same size the machine's available memory holds.
func (t *Topology) Capacity() string {
	var platform, vms int64
	nvm := 0
	for _, ns := range append(t.Layout.Namespaces(), t.Layout.DB2.Name) {
		for _, pid := range nsPIDs(ns) {
			rss := rssBytes(pid)
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.HasPrefix(string(comm), "qemu") {
				vms += rss
				nvm++
			} else {
				platform += rss
			}
		}
	}
	avail := memAvailable()
	if nvm == 0 {
		return fmt.Sprintf("platform processes %d MiB resident, no microVM running, %d MiB available", platform>>20, avail>>20)
	}
	per := vms / int64(nvm)
	reserve := int64(1 << 30) // headroom for the host itself
	more := max(0, (avail-reserve)/per)
	return fmt.Sprintf("platform processes %d MiB resident; %d microVMs %d MiB (%d MiB each); %d MiB available → room for about %d more (%d in all)",
		platform>>20, nvm, vms>>20, per>>20, avail>>20, more, int64(nvm)+more)
}

func rssBytes(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

func memAvailable() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "MemAvailable:") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				return kb << 10
			}
		}
	}
	return 0
}
