// Command lb benchmarks zeitwork-load-balancer against HAProxy (mode tcp)
// in front of the same backend, with the same CPU budget: each balancer is
// pinned to the same core (taskset) with one thread (GOMAXPROCS=1,
// nbthread 1); the backend and the load generator run on the other core.
//
// Both balancers run for the whole benchmark and are measured in
// alternating rounds, so that load from other processes on a shared
// machine falls on both alike; throughput and connection rate keep the
// best round of each. It measures the throughput of a large transfer, new
// connections per second, and the p99 latency a balancer adds to connect +
// a one-byte request/response (its p99 minus the p99 of the same exchange
// made directly with the backend). Latency samples interleave the three
// targets exchange by exchange and are pooled over all rounds. It prints
// Zeitwork ÷ HAProxy ratios.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/zeitwork/zeitwork/bench/benchdoc"
	"github.com/zeitwork/zeitwork/internal/proxyproto"
)

var (
	bulkSize    = flag.Int64("bulk", 1<<30, "bytes per throughput transfer")
	rounds      = flag.Int("rounds", 5, "alternating measurement rounds per balancer")
	phase       = flag.Duration("phase", 3*time.Second, "duration of one connection-rate or latency round")
	concurrency = flag.Int("c", 32, "concurrent clients for the connection rate")
	latClients  = flag.Int("lat-clients", 2, "concurrent clients for the latency rounds")
)

func main() {
	backendAddr := flag.String("backend", "", "run as the backend on this address (internal)")
	load := flag.String("load", "", "only generate connection-rate load against this address for -phase (for profiling)")
	flag.Parse()
	switch {
	case *backendAddr != "":
		runBackend(*backendAddr)
	case *load != "":
		fmt.Printf("%.0f conn/s\n", connRate(*load, *concurrency, *phase))
	default:
		if err := run(); err != nil {
			log.Fatal(err)
		}
	}
}

// runBackend accepts PROXY v2 from loopback (or no header, for the direct
// baseline). A client that sends "B" gets -bulk bytes; "x" gets a one-byte
// answer.
func runBackend(addr string) {
	inner, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	trusted, _ := proxyproto.ParseTrusted([]string{"127.0.0.0/8"})
	ln := proxyproto.NewListener(inner, proxyproto.ListenerConfig{Trusted: trusted})
	zero := make([]byte, 1<<20)
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			defer c.Close()
			var b [1]byte
			if _, err := io.ReadFull(c, b[:]); err != nil {
				return
			}
			switch b[0] {
			case 'B':
				for sent := int64(0); sent < *bulkSize; sent += int64(len(zero)) {
					if _, err := c.Write(zero); err != nil {
						return
					}
				}
			case 'x':
				_, _ = c.Write([]byte{'y'})
			}
		}()
	}
}

type result struct {
	gbps     float64
	connRate float64
	p50, p99 time.Duration
}

// better keeps the best of two rounds for throughput and connection rate.
func (r result) better(o result) result {
	r.gbps = max(r.gbps, o.gbps)
	r.connRate = max(r.connRate, o.connRate)
	return r
}

type target struct {
	name, addr string
	best       result
}

func run() error {
	root, err := os.Getwd()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "bench-lb-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// Build the balancer from this tree, so a stale bin/ cannot be measured.
	lbBin := filepath.Join(dir, "zeitwork-load-balancer")
	build := exec.Command("go", "build", "-o", lbBin, "./cmd/zeitwork-load-balancer")
	build.Dir, build.Stdout, build.Stderr = root, os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("cannot build the load balancer: %w", err)
	}
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		haproxy = "/usr/sbin/haproxy"
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	ports, err := freePorts(4)
	if err != nil {
		return err
	}
	backend, hpAddr, zwAddr, adminAddr := ports[0], ports[1], ports[2], ports[3]

	// Children inherit the raised descriptor limit.
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	lbCPU, genCPU := "1", "0"
	if onlineCPUs() < 2 {
		lbCPU = "0"
	}
	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
			_ = p.Wait()
		}
	}()
	start := func(cmd *exec.Cmd, addr string) error {
		cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("cannot start %s: %w", cmd.Path, err)
		}
		procs = append(procs, cmd)
		return waitPort(addr)
	}
	bcmd := pinned(genCPU, self, "-backend", backend, "-bulk", strconv.FormatInt(*bulkSize, 10))
	bcmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	if err := start(bcmd, backend); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen bench
  bind %s
  server b1 %s send-proxy-v2
`, hpAddr, backend)
	if err := os.WriteFile(filepath.Join(dir, "haproxy.cfg"), []byte(cfg), 0o644); err != nil {
		return err
	}
	if err := start(pinned(lbCPU, haproxy, "-db", "-f", filepath.Join(dir, "haproxy.cfg")), hpAddr); err != nil {
		return err
	}
	zcmd := pinned(lbCPU, lbBin)
	zcmd.Env = append(os.Environ(), "GOMAXPROCS=1", "LB_LISTENERS="+zwAddr+"=>1", "LB_BACKENDS="+backend,
		"LB_ADMIN_ADDR="+adminAddr, "LB_PROXY_PROTOCOL=v2", "LB_ALGORITHM=round-robin", "LOG_LEVEL=error", "LB_MAX_CONNECTIONS=50000")
	if err := start(zcmd, zwAddr); err != nil {
		return err
	}

	// Latency rounds interleave the targets: every client cycles through
	// the backend directly (what the balancers add to), HAProxy and
	// Zeitwork, one exchange each, so all three are sampled under the same
	// machine load; the samples of all rounds are pooled.
	targets := []*target{{name: "haproxy", addr: hpAddr}, {name: "zeitwork", addr: zwAddr}}
	samples := make([][]time.Duration, 3)
	for round := range *rounds {
		for _, t := range targets {
			var r result
			r.gbps = throughput(t.addr, *bulkSize)
			r.connRate = connRate(t.addr, *concurrency, *phase)
			log.Printf("round %d %-9s %.2f GB/s, %.0f conn/s", round+1, t.name, r.gbps, r.connRate)
			t.best = t.best.better(r)
		}
		got := latency([]string{backend, hpAddr, zwAddr}, *latClients, *phase)
		for i := range samples {
			samples[i] = append(samples[i], got[i]...)
		}
		log.Printf("round %d latency samples: %d per target", round+1, len(got[0]))
	}
	direct50, direct := percentiles(samples[0])
	for i, t := range targets {
		t.best.p50, t.best.p99 = percentiles(samples[i+1])
	}
	hp, zw := targets[0].best, targets[1].best
	if hp.gbps == 0 || zw.gbps == 0 || hp.connRate == 0 || zw.connRate == 0 {
		return errors.New("a balancer relayed nothing; see the log above")
	}
	added := func(p time.Duration) time.Duration { return max(p-direct, time.Microsecond) }
	tr, cr, pr := zw.gbps/hp.gbps, zw.connRate/hp.connRate, float64(added(zw.p99))/float64(added(hp.p99))
	us := func(d time.Duration) int64 { return d.Microseconds() }
	table := fmt.Sprintf(`## Load balancer (make bench-lb)

Run %s on %s, %d alternating rounds; throughput and connection rate keep the best round of each, latency pools all rounds' samples (%d per target), taken with the targets interleaved exchange by exchange. Both balancers pinned to CPU %s with one thread (HAProxy %s `+"`mode tcp`, `nbthread 1`"+`; Zeitwork `+"`GOMAXPROCS=1`"+`), PROXY v2 to the same Go backend; backend and load generator on CPU %s.

| metric | HAProxy | Zeitwork | Zeitwork ÷ HAProxy |
|---|---|---|---|
| throughput, one %d MiB transfer (GB/s) | %.2f | %.2f | %.2f |
| new connections/s (%d concurrent clients, %s rounds) | %.0f | %.0f | %.2f |
| p50 connect + 1-byte exchange, %d clients (µs; direct: %d) | %d | %d | %.2f |
| p99 connect + 1-byte exchange (µs; direct to backend: %d) | %d | %d | %.2f |
| **p99 added latency** (p99 − direct p99, µs) | %d | %d | %.2f (lower is better) |
`, time.Now().UTC().Format("2006-01-02"), hostDesc(), *rounds, len(samples[0]), lbCPU, haproxyVersion(haproxy), genCPU,
		*bulkSize>>20, hp.gbps, zw.gbps, tr,
		*concurrency, *phase, hp.connRate, zw.connRate, cr,
		*latClients, us(direct50), us(hp.p50), us(zw.p50), float64(zw.p50)/float64(hp.p50),
		us(direct), us(hp.p99), us(zw.p99), float64(zw.p99)/float64(hp.p99),
		us(added(hp.p99)), us(added(zw.p99)), pr)
	fmt.Print(table)
	if err := benchdoc.Write("lb", table); err != nil {
		log.Printf("cannot record results: %v", err)
	}
	fmt.Printf("bench-lb: throughput_ratio_vs_haproxy=%.2f conn_rate_ratio_vs_haproxy=%.2f p99_ratio_vs_haproxy=%.2f\n", tr, cr, pr)
	return nil
}

func pinned(cpu string, bin string, args ...string) *exec.Cmd {
	if ts, err := exec.LookPath("taskset"); err == nil {
		return exec.Command(ts, append([]string{"-c", cpu, bin}, args...)...)
	}
	return exec.Command(bin, args...)
}

func freePorts(n int) ([]string, error) {
	var out []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer ln.Close()
		out = append(out, ln.Addr().String())
	}
	return out, nil
}

func waitPort(addr string) error {
	for range 400 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(25 * time.Millisecond)
	}
	return fmt.Errorf("%s not listening after 10s", addr)
}

// throughput is one transfer of size bytes from the backend; 0 on failure.
func throughput(addr string, size int64) float64 {
	buf := make([]byte, 1<<20)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	start := time.Now()
	if _, err := c.Write([]byte{'B'}); err != nil {
		return 0
	}
	var n int64
	for n < size {
		m, err := c.Read(buf)
		n += int64(m)
		if err != nil {
			break
		}
	}
	if n < size {
		return 0
	}
	return float64(n) / time.Since(start).Seconds() / 1e9
}

// connRate runs clients doing connect, 1-byte request, answer, close for
// d and returns completed exchanges per second.
func connRate(addr string, clients int, d time.Duration) float64 {
	var done atomic.Int64
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				if ping(addr) == nil {
					done.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return float64(done.Load()) / d.Seconds()
}

func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte{'x'}); err != nil {
		return err
	}
	var b [1]byte
	_, err = io.ReadFull(c, b[:])
	return err
}

// latency samples connect + 1-byte exchange with a few clients for d;
// each client cycles through addrs, one exchange each. It returns the
// samples per address.
func latency(addrs []string, clients int, d time.Duration) [][]time.Duration {
	var mu sync.Mutex
	out := make([][]time.Duration, len(addrs))
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				for i, addr := range addrs {
					s := time.Now()
					if ping(addr) == nil {
						mu.Lock()
						out[i] = append(out[i], time.Since(s))
						mu.Unlock()
					}
				}
			}
		})
	}
	wg.Wait()
	return out
}

// percentiles returns the p50 and p99 of samples (0 without any).
func percentiles(samples []time.Duration) (p50, p99 time.Duration) {
	if len(samples) == 0 {
		return 0, 0
	}
	slices.Sort(samples)
	return samples[len(samples)/2], samples[len(samples)*99/100]
}

func hostDesc() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	model := ""
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "model name") {
			model = strings.TrimSpace(strings.SplitN(sc.Text(), ":", 2)[1])
			break
		}
	}
	return fmt.Sprintf("%s × %d CPUs", model, onlineCPUs())
}

// onlineCPUs counts the machine's CPUs (runtime.NumCPU counts only those
// this process may run on, and make pins the benchmark to one).
func onlineCPUs() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	n := strings.Count(string(b), "\nprocessor\t")
	if strings.HasPrefix(string(b), "processor\t") {
		n++
	}
	return max(n, 1)
}

func haproxyVersion(bin string) string {
	out, _ := exec.CommandContext(context.Background(), bin, "-v").Output()
	f := strings.Fields(string(out))
	if len(f) >= 3 {
		return f[2]
	}
	return ""
}
