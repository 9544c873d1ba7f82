// Command edge benchmarks zeitwork-edge-proxy against nginx and Caddy as
// equivalent reverse proxies (upstream keep-alive; the same request headers
// to the backend — X-Forwarded-For/Proto/Host, X-Real-IP, X-Request-Id and
// the two instance headers a node agent needs — and X-Request-Id on the
// response) in front of the same backend, with the same load generators
// and CPU budget: every proxy is pinned to CPU 1 with one worker (nginx
// worker_processes 1, Caddy and Zeitwork GOMAXPROCS=1); backend and load
// generators run on CPU 0. The backend is nginx answering a fixed 128-byte
// body (-backend-server go: a Go net/http server, whose own collections
// and scheduling on the saturated CPU 0 then set every proxy's tail). The
// proxies are measured in alternating rounds (-rounds), so that load from
// other processes on a shared machine falls on all alike; each figure
// keeps the best round of each proxy. The Zeitwork edge is also measured
// under the plain-HTTP load without and with a /metrics scrape once a
// second (what Prometheus costs it; -only scrape measures and records just
// that part).
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/zeitwork/zeitwork/bench/benchdoc"
	"github.com/zeitwork/zeitwork/internal/devcluster"
)

const (
	host     = "bench.zeitwork.test"
	duration = "8s"
	conns    = 64
)

func main() {
	backend := flag.String("backend", "", "run as the backend on this address (internal)")
	flag.Parse()
	if *backend != "" {
		body := []byte(strings.Repeat("z", 128))
		srv := &http.Server{Addr: *backend, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			_, _ = w.Write(body)
		})}
		log.Fatal(srv.ListenAndServe())
	}
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

type result struct {
	name          string
	rps, httpsRPS float64
	p50, p99      float64 // ms, HTTPS keep-alive
	h2RPS         float64
	h2P99         float64 // ms, from h2load's per-request log
	handshakes    float64
}

// better keeps the best of two rounds for each metric.
func (r result) better(o result) result {
	r.name = o.name
	r.rps = max(r.rps, o.rps)
	r.httpsRPS = max(r.httpsRPS, o.httpsRPS)
	if r.p99 == 0 || (o.p99 != 0 && o.p99 < r.p99) {
		r.p50, r.p99 = o.p50, o.p99
	}
	r.h2RPS = max(r.h2RPS, o.h2RPS)
	if r.h2P99 == 0 || (o.h2P99 != 0 && o.h2P99 < r.h2P99) {
		r.h2P99 = o.h2P99
	}
	r.handshakes = max(r.handshakes, o.handshakes)
	return r
}

var (
	rounds      = flag.Int("rounds", 5, "alternating measurement rounds per proxy (each metric keeps the best)")
	backendKind = flag.String("backend-server", "nginx", "the backend: nginx (return 200, one worker) or go (net/http, whose own GC and scheduling then set every proxy's tail)")
	only        = flag.String("proxies", "zeitwork,nginx,caddy", "comma-separated proxies to measure; the table and summary need all three")
	onlyPart    = flag.String("only", "", "scrape: measure only what a 1 s /metrics scrape costs the Zeitwork edge and record that part")
)

func run() error {
	root, _ := os.Getwd()
	edgeBin := filepath.Join(root, "bin", "zeitwork-edge-proxy")
	if _, err := os.Stat(edgeBin); err != nil {
		return fmt.Errorf("%s missing: run make build first", edgeBin)
	}
	for _, tool := range []string{"wrk", "h2load", "nginx", "caddy"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err2 := os.Stat("/usr/sbin/" + tool); err2 != nil {
				return fmt.Errorf("%s not installed (make deps): %w", tool, err)
			}
		}
	}
	dir, _ := os.MkdirTemp("", "bench-edge-")
	defer os.RemoveAll(dir)
	ca, err := devcluster.EnsureCA(filepath.Join(dir, "ca"), "zeitwork.test")
	if err != nil {
		return err
	}
	self, _ := os.Executable()
	backend := "127.0.0.1:19200"
	var b *exec.Cmd
	switch *backendKind {
	case "go":
		b = pinned("0", self, "-backend", backend)
	case "nginx":
		bdir := filepath.Join(dir, "backend")
		_ = os.MkdirAll(bdir, 0o755)
		bconf := fmt.Sprintf(`daemon off; master_process off; worker_processes 1; pid %[1]s/nginx.pid; error_log %[1]s/error.log crit;
events { worker_connections 4096; }
http {
  access_log off; default_type text/plain; keepalive_requests 1000000;
  client_body_temp_path %[1]s; proxy_temp_path %[1]s; fastcgi_temp_path %[1]s; uwsgi_temp_path %[1]s; scgi_temp_path %[1]s;
  server { listen %[2]s; location / { return 200 "%[3]s"; } }
}
`, bdir, backend, strings.Repeat("z", 128))
		_ = os.WriteFile(filepath.Join(bdir, "nginx.conf"), []byte(bconf), 0o644)
		b = pinned("0", "nginx", "-p", bdir, "-c", filepath.Join(bdir, "nginx.conf"))
	default:
		return fmt.Errorf("-backend-server: %q is neither nginx nor go", *backendKind)
	}
	if err := b.Start(); err != nil {
		return err
	}
	defer b.Process.Kill()
	waitPort(backend)

	// Route table for the Zeitwork edge.
	routes := fmt.Sprintf(`{"version":"1","routes":[{"host":%q,"kind":"production","deployment_id":"d","instances":[{"id":"i","node_address":"http://%s","healthy":true}]}]}`, host, backend)
	opLn, _ := net.Listen("tcp", "127.0.0.1:0")
	go http.Serve(opLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("version") == "1" {
			time.Sleep(10 * time.Second)
		}
		_, _ = io.WriteString(w, routes)
	}))

	nconf := fmt.Sprintf(`daemon off; master_process off; worker_processes 1; pid %[1]s/nginx.pid; error_log %[1]s/nginx-error.log crit;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path %[1]s; proxy_temp_path %[1]s; fastcgi_temp_path %[1]s; uwsgi_temp_path %[1]s; scgi_temp_path %[1]s;
  upstream app { server %[2]s; keepalive 128; }
  server {
    listen 127.0.0.1:19222;
    listen 127.0.0.1:19221 ssl http2;
    ssl_certificate %[3]s; ssl_certificate_key %[4]s;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host; proxy_set_header X-Real-IP $remote_addr; proxy_set_header X-Request-Id $request_id;
      proxy_set_header X-Zeitwork-Instance i; proxy_set_header X-Zeitwork-Token bench; add_header X-Request-Id $request_id; }
  }
}
`, dir, backend, ca.WildcardCert, ca.WildcardKey)
	_ = os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(nconf), 0o644)
	cconf := fmt.Sprintf(`{
	admin off
	auto_https off
	default_sni %[1]s
}
(zw) {
	header X-Request-Id {http.request.uuid}
	reverse_proxy %[4]s {
		header_up X-Real-IP {remote_host}
		header_up X-Request-Id {http.request.uuid}
		header_up X-Zeitwork-Instance i
		header_up X-Zeitwork-Token bench
	}
}
https://%[1]s:19231 {
	tls %[2]s %[3]s
	import zw
}
http://%[1]s:19232 {
	import zw
}
`, host, ca.WildcardCert, ca.WildcardKey, backend)
	_ = os.WriteFile(filepath.Join(dir, "Caddyfile"), []byte(cconf), 0o644)
	// Each proxy is started afresh for each round; the proxies alternate
	// so that load from other processes on a shared machine falls on all
	// alike, and each metric keeps the best round of each proxy.
	type proxy struct {
		name, httpAddr, httpsAddr string
		cmd                       func() *exec.Cmd
	}
	proxies := []proxy{
		{"zeitwork", "127.0.0.1:19212", "127.0.0.1:19211", func() *exec.Cmd {
			z := pinned("1", edgeBin)
			z.Env = append(os.Environ(), "GOMAXPROCS=1", "HTTPS_ADDR=127.0.0.1:19211", "HTTP_ADDR=127.0.0.1:19212", "SSL_CERT_PATH="+ca.WildcardCert,
				"SSL_KEY_PATH="+ca.WildcardKey, "APPS_DOMAIN=zeitwork.test", "OPERATOR_URL=http://"+opLn.Addr().String(), "CLUSTER_TOKEN=bench",
				"RATE_LIMIT_RPS=10000000", "RATE_LIMIT_BURST=1000000", "ACCESS_LOG=false", "LOG_LEVEL=error", "STATE_DIR="+filepath.Join(dir, "edge"))
			return z
		}},
		{"nginx", "127.0.0.1:19222", "127.0.0.1:19221", func() *exec.Cmd {
			return pinned("1", "nginx", "-p", dir, "-c", filepath.Join(dir, "nginx.conf"))
		}},
		{"caddy", "127.0.0.1:19232", "127.0.0.1:19231", func() *exec.Cmd {
			c := pinned("1", "caddy", "run", "--config", filepath.Join(dir, "Caddyfile"), "--adapter", "caddyfile")
			c.Env = append(os.Environ(), "GOMAXPROCS=1", "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
			return c
		}},
	}
	switch *onlyPart {
	case "":
	case "scrape":
		z := proxies[0]
		sc, err := measureScrape(z.cmd, z.httpAddr, z.httpsAddr)
		if err != nil {
			return err
		}
		block := sc.doc()
		fmt.Println(block)
		if err := recordScrape(block); err != nil {
			log.Printf("cannot record results: %v", err)
		}
		fmt.Printf("bench-edge: %s\n", sc.summary())
		return nil
	default:
		return fmt.Errorf("-only: %q is not scrape", *onlyPart)
	}
	results := make([]result, len(proxies))
	chosen := strings.Split(*only, ",")
	for _, c := range chosen {
		if !slices.ContainsFunc(proxies, func(p proxy) bool { return p.name == c }) {
			return fmt.Errorf("-proxies: unknown proxy %q (zeitwork, nginx, caddy)", c)
		}
	}
	for round := range *rounds {
		for i, p := range proxies {
			if !slices.Contains(chosen, p.name) {
				continue
			}
			r, err := measure(p.name, p.cmd(), p.httpAddr, p.httpsAddr)
			if err != nil {
				return err
			}
			log.Printf("round %d/%d: %s measured", round+1, *rounds, p.name)
			results[i] = results[i].better(r)
		}
	}
	if len(chosen) != len(proxies) {
		return nil // partial runs only log their rounds
	}
	z := proxies[0]
	sc, err := measureScrape(z.cmd, z.httpAddr, z.httpsAddr)
	if err != nil {
		return err
	}
	zw, ng, cd := results[0], results[1], results[2]
	var tb strings.Builder
	fmt.Fprintf(&tb, "## Edge proxy (make bench-edge)\n\nRun %s, %d alternating rounds, best round of each proxy kept for each figure. Each proxy pinned to CPU 1 with one worker (nginx `worker_processes 1`, Caddy and Zeitwork `GOMAXPROCS=1`); backend (%s answering 128 bytes) and load generators on CPU 0. nginx and Caddy send the backend the same headers as Zeitwork (X-Forwarded-For/Proto/Host, X-Real-IP, X-Request-Id, two instance headers) and return X-Request-Id. wrk: 1 thread, %d keep-alive connections, %s per figure. HTTP/2: h2load, 16 connections × 10 streams, 6 s; its p99 from h2load's per-request log. Handshakes: 16 Go clients opening a new TLS connection (no resumption) per request.\n\n", time.Now().UTC().Format("2006-01-02"), *rounds, backendName(), conns, duration)
	fmt.Fprintf(&tb, "| proxy | HTTP/1.1 keep-alive rps | HTTPS rps | HTTPS p50 (ms) | HTTPS p99 (ms) | HTTP/2 rps | HTTP/2 p99 (ms) | new TLS handshakes/s |\n|---|---|---|---|---|---|---|---|\n")
	for _, r := range results {
		fmt.Fprintf(&tb, "| %s | %.0f | %.0f | %.2f | %.2f | %.0f | %.2f | %.0f |\n", r.name, r.rps, r.httpsRPS, r.p50, r.p99, r.h2RPS, r.h2P99, r.handshakes)
	}
	fmt.Fprintf(&tb, "| Zeitwork ÷ nginx | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", zw.rps/ng.rps, zw.httpsRPS/ng.httpsRPS, zw.p50/ng.p50, zw.p99/ng.p99, zw.h2RPS/ng.h2RPS, zw.h2P99/ng.h2P99, zw.handshakes/ng.handshakes)
	fmt.Fprintf(&tb, "| Zeitwork ÷ Caddy | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", zw.rps/cd.rps, zw.httpsRPS/cd.httpsRPS, zw.p50/cd.p50, zw.p99/cd.p99, zw.h2RPS/cd.h2RPS, zw.h2P99/cd.h2P99, zw.handshakes/cd.handshakes)
	fmt.Fprintf(&tb, "\n%s\n", sc.doc())
	fmt.Print(tb.String())
	if err := benchdoc.Write("edge", tb.String()); err != nil {
		log.Printf("cannot record results: %v", err)
	}
	fmt.Printf("bench-edge: rps_ratio_vs_nginx=%.2f rps_ratio_vs_caddy=%.2f p99_ratio_vs_nginx=%.2f tls_handshake_ratio_vs_nginx=%.2f h2_rps_ratio_vs_nginx=%.2f h2_p99_ratio_vs_nginx=%.2f %s\n",
		zw.httpsRPS/ng.httpsRPS, zw.httpsRPS/cd.httpsRPS, zw.p99/ng.p99, zw.handshakes/ng.handshakes, zw.h2RPS/ng.h2RPS, zw.h2P99/ng.h2P99, sc.summary())
	return nil
}

func backendName() string {
	if *backendKind == "go" {
		return "a Go net/http server"
	}
	return "nginx `return 200`, one worker"
}

func measure(name string, cmd *exec.Cmd, httpAddr, httpsAddr string) (result, error) {
	stop, err := start(name, cmd, httpAddr, httpsAddr)
	if err != nil {
		return result{}, err
	}
	defer stop()
	r := result{name: name}
	r.rps, _, _ = wrk("http://" + httpAddr + "/")
	r.httpsRPS, r.p50, r.p99 = wrk("https://" + httpsAddr + "/")
	r.h2RPS, r.h2P99 = h2load("https://" + httpsAddr + "/")
	r.handshakes = handshakes(httpsAddr)
	log.Printf("%-8s http %.0f rps, https %.0f rps p50 %.2fms p99 %.2fms, h2 %.0f rps p99 %.2fms, %.0f handshakes/s", name, r.rps, r.httpsRPS, r.p50, r.p99, r.h2RPS, r.h2P99, r.handshakes)
	return r, nil
}

// start starts a proxy, waits until it proxies the bench host and returns
// the function that stops it.
func start(name string, cmd *exec.Cmd, httpAddr, httpsAddr string) (func(), error) {
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
		}
	}
	waitPort(httpAddr)
	waitPort(httpsAddr)
	// Warm up and check the route works.
	for i := 0; ; i++ {
		req, _ := http.NewRequest("GET", "http://"+httpAddr+"/", nil)
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		status := 0
		if err == nil {
			resp.Body.Close()
			status = resp.StatusCode
			if resp.StatusCode == 200 {
				break
			}
		}
		if i > 100 {
			stop()
			return nil, fmt.Errorf("%s does not proxy: status %d, %v", name, status, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return stop, nil
}

var (
	rpsRE = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	pctRE = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s)`)
	// distRE matches wrk's whole latency distribution, logged per run.
	distRE = regexp.MustCompile(`(?m)^\s+(\d+)%\s+([0-9.]+(?:us|ms|s))`)
)

func wrk(url string) (rps, p50, p99 float64) {
	out, err := pinned("0", "wrk", "-t1", "-c"+strconv.Itoa(conns), "-d"+duration, "--latency", "-H", "Host: "+host, url).CombinedOutput()
	if err != nil {
		log.Printf("wrk %s: %v %s", url, err, out)
		return
	}
	if m := rpsRE.FindSubmatch(out); m != nil {
		rps, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	var dist []string
	for _, m := range distRE.FindAllSubmatch(out, -1) {
		dist = append(dist, "p"+string(m[1])+" "+string(m[2]))
	}
	log.Printf("wrk %s: %.0f rps, %s", url, rps, strings.Join(dist, ", "))
	for _, m := range pctRE.FindAllSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(string(m[2]), 64)
		switch string(m[3]) {
		case "us":
			v /= 1000
		case "s":
			v *= 1000
		}
		if string(m[1]) == "50" {
			p50 = v
		} else {
			p99 = v
		}
	}
	return
}

var h2RPSRE = regexp.MustCompile(`finished in [^,]+, ([0-9.]+) req/s`)

// h2load measures HTTP/2 requests/s and the p99 of the per-request
// times (request to end of response) of 200 answers, from h2load's log:
// 16 connections with 10 streams each.
func h2load(url string) (rps, p99 float64) {
	logf, err := os.CreateTemp("", "h2load-*.log")
	if err != nil {
		log.Printf("h2load: %v", err)
		return 0, 0
	}
	logf.Close()
	defer os.Remove(logf.Name())
	out, err := pinned("0", "h2load", "-D", "6", "-c", "16", "-m", "10", "--log-file="+logf.Name(), "-H", ":authority: "+host, url).CombinedOutput()
	m := h2RPSRE.FindSubmatch(out)
	if err != nil || m == nil {
		log.Printf("h2load %s: %v %s", url, err, out)
		return 0, 0
	}
	rps, _ = strconv.ParseFloat(string(m[1]), 64)
	b, _ := os.ReadFile(logf.Name())
	var us []float64
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 3 || f[1] != "200" {
			continue
		}
		if v, err := strconv.ParseFloat(f[2], 64); err == nil {
			us = append(us, v)
		}
	}
	if len(us) == 0 {
		log.Printf("h2load %s: no 200 answers in its log", url)
		return rps, 0
	}
	slices.Sort(us)
	p99 = us[len(us)*99/100] / 1000
	log.Printf("h2load %s: %.0f rps, %d answers, p50 %.2fms p99 %.2fms", url, rps, len(us), us[len(us)/2]/1000, p99)
	return rps, p99
}

// handshakes counts full TLS handshakes + one request per second.
func handshakes(addr string) float64 {
	var n atomic.Int64
	deadline := time.Now().Add(5 * time.Second)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true, ServerName: host, ClientSessionCache: nil}, DisableKeepAlives: true}
				req, _ := http.NewRequestWithContext(context.Background(), "GET", "https://"+addr+"/", nil)
				req.Host = host
				resp, err := tr.RoundTrip(req)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode == 200 {
						n.Add(1)
					}
				}
				tr.CloseIdleConnections()
			}
		})
	}
	wg.Wait()
	return float64(n.Load()) / 5
}

func pinned(cpu, bin string, args ...string) *exec.Cmd {
	if ts, err := exec.LookPath("taskset"); err == nil {
		return exec.Command(ts, append([]string{"-c", cpu, bin}, args...)...)
	}
	return exec.Command(bin, args...)
}

func waitPort(addr string) {
	for range 200 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// scrapeResult is what a Prometheus scrape once a second costs the
// Zeitwork edge under the plain-HTTP wrk load.
type scrapeResult struct {
	plain, scraped float64         // best wrk rps of the rounds without and with the scrape loop
	scrapes        []time.Duration // every scrape that started and ended under load
	failed         int             // scrapes under load that failed or did not answer 200
	size           int             // bytes of the last scrape's exposition
	cpuMS          float64         // the edge's CPU time per scrape, idle edge, ms
}

// costPct is the throughput lost to scraping, in percent of the plain
// rounds' best; negative when noise outweighs it.
func (s scrapeResult) costPct() float64 {
	if s.plain == 0 {
		return 0
	}
	return (1 - s.scraped/s.plain) * 100
}

// latency returns the median and the longest scrape, in milliseconds.
func (s scrapeResult) latency() (p50, maxMS float64) {
	if len(s.scrapes) == 0 {
		return 0, 0
	}
	d := slices.Clone(s.scrapes)
	slices.Sort(d)
	ms := func(t time.Duration) float64 { return float64(t) / float64(time.Millisecond) }
	return ms(d[len(d)/2]), ms(d[len(d)-1])
}

func (s scrapeResult) summary() string {
	p50, maxMS := s.latency()
	return fmt.Sprintf("scrape_cost_pct=%.2f scrape_p50_ms=%.1f scrape_max_ms=%.1f scrape_failed=%d scrape_cpu_ms=%.2f", s.costPct(), p50, maxMS, s.failed, s.cpuMS)
}

const (
	scrapeBegin = "<!-- bench:edge-scrape:begin -->"
	scrapeEnd   = "<!-- bench:edge-scrape:end -->"
)

// doc is the scrape part of the edge section, between its own markers so
// that -only scrape can replace it alone.
func (s scrapeResult) doc() string {
	p50, maxMS := s.latency()
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n**Prometheus scrape cost** (run %s; `taskset -c 0 go run ./bench/edge -only scrape` measures this part alone): Zeitwork's HTTP/1.1 keep-alive wrk load as above, in %d alternating rounds without and with a goroutine that GETs the edge's `/metrics` (on its HTTP port, as Prometheus scrapes :8083) once per second during the round only; the edge is started afresh for each round and the best round of each kind is kept. Scrape latency is over every scrape that ran under load, taken on the loaded CPU 0 beside wrk. Edge CPU per scrape: the edge process's user+system time over %d back-to-back scrapes of an idle edge, divided by their number; at one scrape a second on the edge's one saturated core, it is the share of throughput the scrape takes (%.2f ms ≈ %.2f %%), a figure the round-to-round noise of a shared machine does not blur.\n\n", scrapeBegin, time.Now().UTC().Format("2006-01-02"), *rounds, cpuScrapes, s.cpuMS, s.cpuMS/10)
	fmt.Fprintf(&b, "| Zeitwork HTTP/1.1 rps, no scrape | with a 1 s scrape | throughput cost | scrapes under load (failed) | scrape p50 (ms) | scrape max (ms) | exposition size (bytes) | edge CPU per scrape (ms) |\n|---|---|---|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| %.0f | %.0f | %.2f %% | %d (%d) | %.1f | %.1f | %d | %.2f |\n%s", s.plain, s.scraped, s.costPct(), len(s.scrapes), s.failed, p50, maxMS, s.size, s.cpuMS, scrapeEnd)
	return b.String()
}

// measureScrape runs the Zeitwork edge under the plain-HTTP wrk load in
// alternating rounds without and with a 1 s /metrics scrape loop, which
// runs only while that round's wrk does.
func measureScrape(cmd func() *exec.Cmd, httpAddr, httpsAddr string) (scrapeResult, error) {
	var s scrapeResult
	for round := range *rounds {
		order := []bool{false, true}
		if round%2 == 1 {
			order = []bool{true, false} // neither kind always runs first
		}
		for _, scrape := range order {
			stop, err := start("zeitwork", cmd(), httpAddr, httpsAddr)
			if err != nil {
				return s, err
			}
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			var durs []time.Duration
			var failed, size int
			if scrape {
				wg.Go(func() { durs, failed, size = scrapeLoop(ctx, "http://"+httpAddr+"/metrics") })
			}
			rps, _, _ := wrk("http://" + httpAddr + "/")
			cancel()
			wg.Wait()
			stop()
			if scrape {
				s.scraped = max(s.scraped, rps)
				s.scrapes = append(s.scrapes, durs...)
				s.failed += failed
				if size > 0 {
					s.size = size
				}
				log.Printf("scrape round %d/%d: with scrape %.0f rps, %d scrapes (%d failed)", round+1, *rounds, rps, len(durs), failed)
			} else {
				s.plain = max(s.plain, rps)
				log.Printf("scrape round %d/%d: without scrape %.0f rps", round+1, *rounds, rps)
			}
		}
	}
	c := cmd()
	stop, err := start("zeitwork", c, httpAddr, httpsAddr)
	if err != nil {
		return s, err
	}
	s.cpuMS, err = scrapeCPU(c.Process.Pid, "http://"+httpAddr+"/metrics")
	stop()
	if err != nil {
		return s, err
	}
	log.Printf("scrape: %s", s.summary())
	return s, nil
}

const cpuScrapes = 200

// promAccept is the Accept header of a Prometheus scrape (which also asks
// for gzip, as Go's client does by default).
const promAccept = "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"

// scrapeCPU returns the CPU time, in milliseconds, that process pid (the
// edge; taskset execs it in place) spends per scrape of url, over
// cpuScrapes back-to-back scrapes.
func scrapeCPU(pid int, url string) (float64, error) {
	cpu := func() (float64, error) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return 0, err
		}
		_, rest, _ := strings.Cut(string(b), ") ")
		f := strings.Fields(rest) // from field 3 (state): utime is field 14, stime 15
		if len(f) < 13 {
			return 0, fmt.Errorf("/proc/%d/stat: %q", pid, b)
		}
		u, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		return (u + st) * 10, nil // USER_HZ 100: ticks of 10 ms
	}
	before, err := cpu()
	if err != nil {
		return 0, err
	}
	for range cpuScrapes {
		req, _ := http.NewRequest("GET", url, nil)
		req.Header.Set("Accept", promAccept)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	after, err := cpu()
	if err != nil {
		return 0, err
	}
	return (after - before) / cpuScrapes, nil
}

// scrapeLoop GETs url once a second, as Prometheus does, until ctx ends,
// and returns the durations of the scrapes (request to last body byte)
// that ended before ctx, how many of those failed, and the last size.
func scrapeLoop(ctx context.Context, url string) (durs []time.Duration, failed, size int) {
	client := &http.Client{Timeout: 10 * time.Second} // Prometheus' default scrape_timeout
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
		req.Header.Set("Accept", promAccept)
		t0 := time.Now()
		resp, err := client.Do(req)
		n := 0
		if err == nil {
			var b []byte
			b, err = io.ReadAll(resp.Body)
			resp.Body.Close()
			n = len(b)
			if err == nil && (resp.StatusCode != 200 || !strings.Contains(string(b), "zeitwork_edge")) {
				err = fmt.Errorf("status %d, %d bytes", resp.StatusCode, n)
			}
		}
		d := time.Since(t0)
		if ctx.Err() != nil {
			return // the round ended during this scrape
		}
		if err != nil {
			log.Printf("scrape %s: %v", url, err)
			failed++
			continue
		}
		durs, size = append(durs, d), n
	}
}

// recordScrape replaces the scrape part of the edge section of
// docs/benchmarks.md, keeping the rest of the section as the last full
// run wrote it (and appending the part if that run had none).
func recordScrape(block string) error {
	dir, _ := os.Getwd()
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return fmt.Errorf("cannot find the repository root")
		}
		dir = parent
	}
	doc, err := os.ReadFile(filepath.Join(dir, "docs", "benchmarks.md"))
	if err != nil {
		return err
	}
	_, rest, ok1 := strings.Cut(string(doc), "<!-- bench:edge:begin -->")
	body, _, ok2 := strings.Cut(rest, "<!-- bench:edge:end -->")
	if !ok1 || !ok2 {
		return fmt.Errorf("docs/benchmarks.md has no edge section: run the whole bench")
	}
	if i, j := strings.Index(body, scrapeBegin), strings.Index(body, scrapeEnd); i >= 0 && j > i {
		body = body[:i] + block + body[j+len(scrapeEnd):]
	} else {
		body = strings.TrimSpace(body) + "\n\n" + block
	}
	return benchdoc.Write("edge", body)
}
