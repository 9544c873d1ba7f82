package geodns

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// Target is one load balancer health check.
type Target struct {
	Key  string // identity across reloads: the URL or tcp://host:port
	Kind string // "http" or "tcp"
	Addr string // host:port probed
	URL  string // for http
}

// checker probes every target each interval and keeps its up/down state
// with fall/rise hysteresis. Its state survives reloads for targets that
// stay.
type checker struct {
	log    *slog.Logger
	client *http.Client
	wake   chan struct{}

	mu      sync.RWMutex
	cfg     Health
	states  map[string]*targetState
	rounds  int64
	changes int64 // up/down transitions, for tests and metrics
}

type targetState struct {
	Target
	known  bool // checked at least once
	up     bool
	fails  int
	passes int
	err    string
	since  time.Time
}

func newChecker(cfg Health, targets []Target, log *slog.Logger) *checker {
	c := &checker{
		log:  log,
		wake: make(chan struct{}, 1),
		client: &http.Client{
			// A fresh connection per probe: a load balancer that stops
			// accepting must fail its check, not ride on an idle one.
			Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
	}
	c.update(cfg, targets)
	return c
}

// update replaces the configuration and the target set; targets that stay
// keep their state, new ones are probed at once.
func (c *checker) update(cfg Health, targets []Target) {
	c.mu.Lock()
	states := make(map[string]*targetState, len(targets))
	for _, t := range targets {
		if old := c.states[t.Key]; old != nil {
			states[t.Key] = old
		} else {
			states[t.Key] = &targetState{Target: t}
		}
	}
	c.cfg, c.states = cfg, states
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// up reports whether the target passes. A target not yet checked counts
// as up: until the first probe there is no evidence against it.
func (c *checker) up(key string) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	s := c.states[key]
	return s == nil || !s.known || s.up
}

// ready reports whether every target has been checked once.
func (c *checker) ready() error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, s := range c.states {
		if !s.known {
			return fmt.Errorf("%s not checked yet", s.Key)
		}
	}
	return nil
}

// Run probes until ctx ends.
func (c *checker) Run(ctx context.Context) error {
	for {
		c.round(ctx)
		c.mu.RLock()
		iv := time.Duration(c.cfg.Interval)
		c.mu.RUnlock()
		t := time.NewTimer(iv)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		case <-c.wake:
			t.Stop()
		}
	}
}

// round probes every target concurrently and applies the results.
func (c *checker) round(ctx context.Context) {
	c.mu.RLock()
	cfg := c.cfg
	targets := make([]Target, 0, len(c.states))
	for _, s := range c.states {
		targets = append(targets, s.Target)
	}
	c.mu.RUnlock()

	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	for i, t := range targets {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, time.Duration(cfg.Timeout))
			defer cancel()
			errs[i] = c.probe(pctx, t)
		})
	}
	wg.Wait()
	if ctx.Err() != nil {
		return // results of probes cut short by shutdown say nothing
	}

	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rounds++
	for i, t := range targets {
		s := c.states[t.Key]
		if s == nil {
			continue // removed by a reload meanwhile
		}
		was, known := s.up, s.known
		if err := errs[i]; err == nil {
			s.fails, s.err = 0, ""
			s.passes++
			if !known || s.passes >= c.cfg.Rise {
				s.up = true
			}
		} else {
			s.passes, s.err = 0, err.Error()
			s.fails++
			if !known || s.fails >= c.cfg.Fall {
				s.up = false
			}
		}
		s.known = true
		if !known || was != s.up {
			s.since = now
			if known {
				c.changes++
			}
			if s.up {
				c.log.Info("load balancer up", "check", s.Key)
			} else {
				c.log.Warn("load balancer down", "check", s.Key, "err", s.err)
			}
		}
	}
}

func (c *checker) probe(ctx context.Context, t Target) error {
	if t.Kind == "tcp" {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", t.Addr)
		if err != nil {
			return err
		}
		return conn.Close()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.URL, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "zeitwork-dns health check")
	resp, err := c.client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return errors.New(resp.Status)
	}
	return nil
}

// targetStatus is one target's state for /health and the metrics.
type targetStatus struct {
	Up    bool
	Known bool
	Err   string
	Since time.Time
}

func (c *checker) status(key string) targetStatus {
	c.mu.RLock()
	defer c.mu.RUnlock()
	s := c.states[key]
	if s == nil {
		return targetStatus{Up: true}
	}
	return targetStatus{Up: !s.known || s.up, Known: s.known, Err: s.err, Since: s.since}
}
