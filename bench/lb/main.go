// Command lb benchmarks zeitwork-load-balancer against HAProxy (mode tcp)
// in front of the same backend, with the same CPU budget: each balancer is
// pinned to the same core (taskset) with one thread (GOMAXPROCS=1,
// nbthread 1); the backend and the load generator run on the other core.
//
// It measures throughput of a large transfer, new connections per second
// and p99 latency of a small request on a new connection, and prints
// Zeitwork ÷ HAProxy ratios.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/zeitwork/zeitwork/bench/benchdoc"
	"github.com/zeitwork/zeitwork/internal/proxyproto"
)

const (
	bulkSize    = 2 << 30 // bytes per throughput run
	phase       = 5 * time.Second
	concurrency = 32
)

func main() {
	backendAddr := flag.String("backend", "", "run as the backend on this address (internal)")
	flag.Parse()
	if *backendAddr != "" {
		runBackend(*backendAddr)
		return
	}
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

// runBackend accepts PROXY v2 from loopback. A client that sends "B" gets
// bulkSize bytes; "P" gets a one-byte answer.
func runBackend(addr string) {
	inner, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	trusted, _ := proxyproto.ParseTrusted([]string{"127.0.0.0/8"})
	ln := proxyproto.NewListener(inner, proxyproto.ListenerConfig{Trusted: trusted, Required: true})
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
				for sent := 0; sent < bulkSize; sent += len(zero) {
					if _, err := c.Write(zero); err != nil {
						return
					}
				}
			case 'P':
				_, _ = c.Write([]byte{'p'})
			}
		}()
	}
}

type result struct {
	gbps     float64
	connRate float64
	p50, p99 time.Duration
}

func run() error {
	root, err := os.Getwd()
	if err != nil {
		return err
	}
	lbBin := filepath.Join(root, "bin", "zeitwork-load-balancer")
	if _, err := os.Stat(lbBin); err != nil {
		return fmt.Errorf("%s missing: run make build first", lbBin)
	}
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		haproxy = "/usr/sbin/haproxy"
	}
	self, _ := os.Executable()
	backend := "127.0.0.1:19100"
	bcmd := pinned("0", self, "-backend", backend)
	if err := bcmd.Start(); err != nil {
		return err
	}
	defer bcmd.Process.Kill()
	if err := waitPort(backend); err != nil {
		return err
	}

	dir, _ := os.MkdirTemp("", "bench-lb-")
	defer os.RemoveAll(dir)
	cfg := fmt.Sprintf(`global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen bench
  bind 127.0.0.1:19101
  server b1 %s send-proxy-v2
`, backend)
	_ = os.WriteFile(filepath.Join(dir, "haproxy.cfg"), []byte(cfg), 0o644)
	hcmd := pinned("1", haproxy, "-db", "-f", filepath.Join(dir, "haproxy.cfg"))
	zcmd := pinned("1", lbBin)
	zcmd.Env = append(os.Environ(), "GOMAXPROCS=1", "LB_LISTENERS=127.0.0.1:19102=>1", "LB_BACKENDS="+backend,
		"LB_ADMIN_ADDR=127.0.0.1:19103", "LB_PROXY_PROTOCOL=v2", "LB_ALGORITHM=round-robin", "LOG_LEVEL=error", "LB_MAX_CONNECTIONS=50000")

	measure := func(name string, cmd *exec.Cmd, addr string) (result, error) {
		cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
		if err := cmd.Start(); err != nil {
			return result{}, fmt.Errorf("start %s: %w", name, err)
		}
		defer func() { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() }()
		if err := waitPort(addr); err != nil {
			return result{}, err
		}
		var r result
		r.gbps = throughput(addr)
		r.connRate = connRate(addr)
		r.p50, r.p99 = latency(addr)
		log.Printf("%-9s throughput %.2f GB/s, %.0f conn/s, p50 %v, p99 %v", name, r.gbps, r.connRate, r.p50, r.p99)
		return r, nil
	}
	hp, err := measure("haproxy", hcmd, "127.0.0.1:19101")
	if err != nil {
		return err
	}
	zw, err := measure("zeitwork", zcmd, "127.0.0.1:19102")
	if err != nil {
		return err
	}
	tr, cr, pr := zw.gbps/hp.gbps, zw.connRate/hp.connRate, float64(zw.p99)/float64(hp.p99)
	table := fmt.Sprintf(`## Load balancer (make bench-lb)

Run %s on %s. Both balancers pinned to CPU 1 with one thread (HAProxy %s `+"`nbthread 1`"+`, Zeitwork `+"`GOMAXPROCS=1`"+`); backend and load generator on CPU 0; PROXY v2 to the backend in both.

| metric | HAProxy | Zeitwork | ratio (Zeitwork ÷ HAProxy) |
|---|---|---|---|
| throughput, one 2 GiB transfer (GB/s) | %.2f | %.2f | %.2f |
| new connections/s (%d concurrent clients, %s) | %.0f | %.0f | %.2f |
| p50 connect + 1-byte request (µs) | %d | %d | %.2f |
| p99 connect + 1-byte request (µs) | %d | %d | %.2f (lower is better) |
`, time.Now().UTC().Format("2006-01-02"), hostDesc(), haproxyVersion(haproxy), hp.gbps, zw.gbps, tr, concurrency, phase, hp.connRate, zw.connRate, cr,
		hp.p50.Microseconds(), zw.p50.Microseconds(), float64(zw.p50)/float64(hp.p50), hp.p99.Microseconds(), zw.p99.Microseconds(), pr)
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

func waitPort(addr string) error {
	for range 200 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(25 * time.Millisecond)
	}
	return fmt.Errorf("%s not listening", addr)
}

// throughput is the best of three single-connection bulk transfers.
func throughput(addr string) float64 {
	best := 0.0
	buf := make([]byte, 1<<20)
	for range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			continue
		}
		_ = c.SetDeadline(time.Now().Add(60 * time.Second))
		start := time.Now()
		_, _ = c.Write([]byte{'B'})
		var n int64
		for n < bulkSize {
			m, err := c.Read(buf)
			n += int64(m)
			if err != nil {
				break
			}
		}
		el := time.Since(start)
		c.Close()
		if gbps := float64(n) / el.Seconds() / 1e9; n == bulkSize && gbps > best {
			best = gbps
		}
	}
	return best
}

// connRate runs concurrent clients doing connect, 1-byte request, answer,
// close for one phase.
func connRate(addr string) float64 {
	var done atomic.Int64
	deadline := time.Now().Add(phase)
	var wg sync.WaitGroup
	for range concurrency {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				if ping(addr) == nil {
					done.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return float64(done.Load()) / phase.Seconds()
}

func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte{'P'}); err != nil {
		return err
	}
	var b [1]byte
	_, err = io.ReadFull(c, b[:])
	return err
}

// latency samples connect + request at a moderate load (4 clients).
func latency(addr string) (p50, p99 time.Duration) {
	var mu sync.Mutex
	var samples []time.Duration
	deadline := time.Now().Add(phase)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				s := time.Now()
				if ping(addr) == nil {
					mu.Lock()
					samples = append(samples, time.Since(s))
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
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
	n, _ := exec.Command("nproc").Output()
	return fmt.Sprintf("%s × %s CPUs", model, strings.TrimSpace(string(n)))
}

func haproxyVersion(bin string) string {
	out, _ := exec.CommandContext(context.Background(), bin, "-v").Output()
	f := strings.Fields(string(out))
	if len(f) >= 3 {
		return f[2]
	}
	return ""
}
