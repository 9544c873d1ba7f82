package lb

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/zeitwork/zeitwork/internal/proxyproto"
)

// HealthConfig controls active and passive health checking.
type HealthConfig struct {
	Interval time.Duration // between check rounds (default 2 s)
	Timeout  time.Duration // per check (default 1 s)
	Rise     int           // consecutive successes to come back (default 2)
	Fall     int           // consecutive failures to be taken out (default 3)
	// HTTPPath, when set, also checks GET http://host:HTTPPort/HTTPPath
	// for a 2xx answer after the TCP connect succeeds.
	HTTPPath string
	HTTPPort int
	// EjectAfter connect failures in a row on live traffic take a backend
	// out at once; it comes back after Rise successful checks (default 3).
	EjectAfter int
}

func (h *HealthConfig) defaults() {
	if h.Interval <= 0 {
		h.Interval = 2 * time.Second
	}
	if h.Timeout <= 0 {
		h.Timeout = time.Second
	}
	if h.Rise <= 0 {
		h.Rise = 2
	}
	if h.Fall <= 0 {
		h.Fall = 3
	}
	if h.EjectAfter <= 0 {
		h.EjectAfter = 3
	}
	if h.HTTPPort == 0 {
		h.HTTPPort = 8083
	}
}

// runHealth checks every backend of every pool once per Interval until
// ctx ends.
func (l *LB) runHealth(ctx context.Context) {
	t := time.NewTicker(l.cfg.Health.Interval)
	defer t.Stop()
	client := &http.Client{
		Timeout:   l.cfg.Health.Timeout,
		Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
	}
	for {
		var wg sync.WaitGroup
		for _, p := range l.pools {
			for _, b := range p.Backends() {
				wg.Go(func() { l.record(b, l.check(ctx, client, b)) })
			}
		}
		wg.Wait()
		l.updateGauges()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// check connects to b (sending a PROXY LOCAL header when the balancer
// speaks PROXY, like HAProxy's check-send-proxy) and, when configured, asks
// the backend's HTTP health endpoint.
func (l *LB) check(ctx context.Context, client *http.Client, b *Backend) error {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.Health.Timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", b.Addr)
	if err != nil {
		return err
	}
	b.resolved(c.RemoteAddr().(*net.TCPAddr).AddrPort())
	if l.cfg.ProxyProtocol != "off" {
		h := proxyproto.Header{Version: 2, Command: proxyproto.Local}
		if l.cfg.ProxyProtocol == "v1" {
			h.Version = 1
		}
		_ = c.SetWriteDeadline(time.Now().Add(l.cfg.Health.Timeout))
		_, err = c.Write(h.Format())
	}
	_ = c.Close()
	if err != nil {
		return err
	}
	if l.cfg.Health.HTTPPath == "" {
		return nil
	}
	host, _, _ := net.SplitHostPort(b.Addr)
	url := "http://" + net.JoinHostPort(host, strconv.Itoa(l.cfg.Health.HTTPPort)) + l.cfg.Health.HTTPPath
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_ = resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	return nil
}

// record applies one active check result with rise/fall hysteresis.
func (l *LB) record(b *Backend, err error) {
	h := &l.cfg.Health
	if err == nil {
		l.metrics.healthChecks.WithLabelValues("ok").Inc()
	} else {
		l.metrics.healthChecks.WithLabelValues("failed").Inc()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err == nil {
		b.fall = 0
		if b.healthy.Load() {
			b.lastErr = ""
			return
		}
		b.rise++
		if b.rise >= h.Rise {
			b.rise = 0
			b.lastErr = ""
			b.connectFails.Store(0)
			b.healthy.Store(true)
			l.log.Info("backend up", "backend", b.Addr)
		}
		return
	}
	b.rise = 0
	b.lastErr = err.Error()
	if !b.healthy.Load() {
		return
	}
	b.fall++
	if b.fall >= h.Fall {
		b.fall = 0
		b.healthy.Store(false)
		l.log.Warn("backend down", "backend", b.Addr, "err", err)
	}
}

// passiveFailure counts a failed connect from live traffic; EjectAfter in
// a row take the backend out at once, without waiting for the checker.
func (l *LB) passiveFailure(b *Backend, err error) {
	b.failures.Add(1)
	n := b.connectFails.Add(1)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lastErr = err.Error()
	if int(n) >= l.cfg.Health.EjectAfter && b.healthy.Load() {
		b.healthy.Store(false)
		b.rise, b.fall = 0, 0
		l.log.Warn("backend ejected after connect failures", "backend", b.Addr, "consecutive_failures", n, "err", err)
	}
}

// updateGauges publishes per-backend state, dropping removed backends.
func (l *LB) updateGauges() {
	l.gaugeMu.Lock()
	defer l.gaugeMu.Unlock()
	seen := map[[2]string]bool{}
	for i, p := range l.pools {
		ls := l.cfg.Listeners[i].Addr
		for _, b := range p.Backends() {
			up := 0.0
			if b.Usable() {
				up = 1
			}
			l.metrics.backendUp.WithLabelValues(ls, b.Addr).Set(up)
			l.metrics.backendActive.WithLabelValues(ls, b.Addr).Set(float64(b.active.Load()))
			l.metrics.backendTotal.WithLabelValues(ls, b.Addr).Set(float64(b.total.Load()))
			l.metrics.backendFails.WithLabelValues(ls, b.Addr).Set(float64(b.failures.Load()))
			seen[[2]string{ls, b.Addr}] = true
		}
	}
	for k := range l.gauged {
		if !seen[k] {
			for _, v := range []interface{ DeleteLabelValues(...string) bool }{l.metrics.backendUp, l.metrics.backendActive, l.metrics.backendTotal, l.metrics.backendFails} {
				v.DeleteLabelValues(k[0], k[1])
			}
		}
	}
	l.gauged = seen
}
