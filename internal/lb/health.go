package lb

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"
)

var errTooManyFiles = syscall.EMFILE

// HealthConfig controls active and passive health checking.
type HealthConfig struct {
	Interval time.Duration // between checks of one backend (default 2 s)
	Timeout  time.Duration // per check (default 1 s)
	Rise     int           // consecutive successes to come back (default 2)
	Fall     int           // consecutive failures to be taken out (default 3)
	// HTTPPath, when set, checks GET http://host:HTTPPort/HTTPPath for a
	// 2xx answer in addition to the TCP connect.
	HTTPPath string
	HTTPPort int
	// EjectAfter passive connect failures in a row take a backend out
	// until its next successful active check (default 3).
	EjectAfter int
}

func (h *HealthConfig) defaults() {
	if h.Interval == 0 {
		h.Interval = 2 * time.Second
	}
	if h.Timeout == 0 {
		h.Timeout = time.Second
	}
	if h.Rise == 0 {
		h.Rise = 2
	}
	if h.Fall == 0 {
		h.Fall = 3
	}
	if h.EjectAfter == 0 {
		h.EjectAfter = 3
	}
}

func (l *LB) runHealth(ctx context.Context) {
	l.cfg.Health.defaults()
	t := time.NewTicker(l.cfg.Health.Interval)
	defer t.Stop()
	client := &http.Client{Timeout: l.cfg.Health.Timeout}
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

func (l *LB) check(ctx context.Context, client *http.Client, b *Backend) error {
	d := net.Dialer{Timeout: l.cfg.Health.Timeout}
	c, err := d.DialContext(ctx, "tcp", b.Addr)
	if err != nil {
		return err
	}
	c.Close()
	if l.cfg.Health.HTTPPath == "" {
		return nil
	}
	host, _, _ := net.SplitHostPort(b.Addr)
	url := fmt.Sprintf("http://%s%s", net.JoinHostPort(host, fmt.Sprint(l.cfg.Health.HTTPPort)), l.cfg.Health.HTTPPath)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("health check %s: status %d", url, resp.StatusCode)
	}
	return nil
}

// record applies one active check result with rise/fall hysteresis.
func (l *LB) record(b *Backend, err error) {
	h := &l.cfg.Health
	b.mu.Lock()
	defer b.mu.Unlock()
	if err == nil {
		b.fall = 0
		b.lastErr = ""
		if !b.healthy.Load() {
			b.rise++
			if b.rise >= h.Rise {
				b.healthy.Store(true)
				b.ejected = false
				b.rise = 0
				l.log.Info("backend up", "backend", b.Addr)
			}
		} else if b.ejected {
			b.ejected = false
		}
		return
	}
	b.rise = 0
	b.lastErr = err.Error()
	if b.healthy.Load() {
		b.fall++
		if b.fall >= h.Fall {
			b.healthy.Store(false)
			b.fall = 0
			l.log.Warn("backend down", "backend", b.Addr, "err", err)
		}
	}
}

// passiveFailure counts a failed connect from live traffic; enough in a
// row eject the backend at once, without waiting for the checker.
func (l *LB) passiveFailure(b *Backend, err error) {
	n := b.failures.Add(1)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lastErr = err.Error()
	b.fall++
	if b.healthy.Load() && b.fall >= l.cfg.Health.EjectAfter {
		b.healthy.Store(false)
		b.ejected = true
		b.fall = 0
		l.log.Warn("backend ejected after connect failures", "backend", b.Addr, "failures_total", n, "err", err)
	}
}

func (l *LB) updateGauges() {
	for _, p := range l.pools {
		for _, b := range p.Backends() {
			v := 0.0
			if b.Usable() {
				v = 1
			}
			l.metrics.backendUp.WithLabelValues(b.Addr).Set(v)
		}
	}
}
