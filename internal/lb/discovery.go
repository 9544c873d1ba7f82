package lb

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"time"
)

// Discovery keeps a balancer's backends equal to its static list plus the
// region's edge proxies registered with the operator
// (GET /api/v1/internal/edges?region=R).
type Discovery struct {
	Operators []*url.URL // tried in order until one answers
	Region    string
	Token     string // CLUSTER_TOKEN, sent as a bearer token
	Interval  time.Duration
	Static    []string // always included
	Client    *http.Client
	Log       *slog.Logger
}

// BackendSetter receives the backend list.
type BackendSetter interface{ SetBackends(hosts []string) }

var _ BackendSetter = (*LB)(nil)

type edge struct {
	ID           string `json:"id"`
	Region       string `json:"region"`
	HTTPSAddress string `json:"https_address"`
	HTTPAddress  string `json:"http_address"`
}

// Fetch asks the operators in turn for the region's edges and returns their
// hosts, sorted and without duplicates.
func (d *Discovery) Fetch(ctx context.Context) ([]string, error) {
	client := d.Client
	if client == nil {
		client = &http.Client{Timeout: 5 * time.Second}
	}
	var errs []error
	for _, op := range d.Operators {
		hosts, err := d.fetch(ctx, client, op)
		if err == nil {
			return hosts, nil
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("cannot discover edge proxies: %v", errs)
}

func (d *Discovery) fetch(ctx context.Context, client *http.Client, op *url.URL) ([]string, error) {
	u := op.JoinPath("/api/v1/internal/edges")
	u.RawQuery = url.Values{"region": {d.Region}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	if d.Token != "" {
		req.Header.Set("Authorization", "Bearer "+d.Token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: status %d", u.Redacted(), resp.StatusCode)
	}
	var edges []edge
	if err := json.NewDecoder(io.LimitReader(resp.Body, 4<<20)).Decode(&edges); err != nil {
		return nil, fmt.Errorf("GET %s: %w", u.Redacted(), err)
	}
	var hosts []string
	for _, e := range edges {
		if e.Region != "" && d.Region != "" && e.Region != d.Region {
			continue
		}
		host, _, err := net.SplitHostPort(e.HTTPSAddress)
		if err != nil {
			host = e.HTTPSAddress
		}
		if host != "" {
			hosts = append(hosts, host)
		}
	}
	slices.Sort(hosts)
	return slices.Compact(hosts), nil
}

// Run sets the backends now and after every Interval (or a value on
// refresh) until ctx ends. While the operators are unreachable it keeps the
// last list it got.
func (d *Discovery) Run(ctx context.Context, dst BackendSetter, refresh <-chan struct{}) error {
	log := d.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	interval := d.Interval
	if interval <= 0 {
		interval = 10 * time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	var last []string
	for {
		if len(d.Operators) > 0 {
			hosts, err := d.Fetch(ctx)
			switch {
			case err != nil && ctx.Err() == nil:
				log.Warn("edge discovery failed; keeping the last known backends", "err", err, "backends", len(last))
			case err == nil:
				if !slices.Equal(hosts, last) {
					log.Info("edge proxies discovered", "edges", hosts)
				}
				last = hosts
			}
		}
		all := append(slices.Clone(d.Static), last...)
		slices.Sort(all)
		dst.SetBackends(slices.Compact(all))
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-refresh:
		}
	}
}
