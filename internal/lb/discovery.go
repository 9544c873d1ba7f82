package lb

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"time"
)

// Discovery fetches the region's edge proxies from the operators.
type Discovery struct {
	Operators []*url.URL
	Region    string
	Token     string
	Interval  time.Duration
	Static    []string // always included
	Client    *http.Client
}

type edge struct {
	ID           string `json:"id"`
	Region       string `json:"region"`
	HTTPSAddress string `json:"https_address"`
}

// Fetch asks each operator in turn for the region's edges and returns their
// hosts.
func (d *Discovery) Fetch(ctx context.Context) ([]string, error) {
	var lastErr error
	for _, op := range d.Operators {
		u := op.JoinPath("/api/v1/internal/edges")
		u.RawQuery = url.Values{"region": {d.Region}}.Encode()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if d.Token != "" {
			req.Header.Set("Authorization", "Bearer "+d.Token)
		}
		resp, err := d.Client.Do(req)
		if err != nil {
			lastErr = err
			continue
		}
		var edges []edge
		err = json.NewDecoder(resp.Body).Decode(&edges)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || err != nil {
			lastErr = fmt.Errorf("%s: status %d: %v", u, resp.StatusCode, err)
			continue
		}
		var hosts []string
		for _, e := range edges {
			host, _, err := net.SplitHostPort(e.HTTPSAddress)
			if err != nil {
				host = e.HTTPSAddress
			}
			if host != "" && !slices.Contains(hosts, host) {
				hosts = append(hosts, host)
			}
		}
		return hosts, nil
	}
	return nil, fmt.Errorf("cannot discover edge proxies: %w", lastErr)
}

// Run keeps l's backends equal to the static list plus the discovered
// edges, keeping the last known list while the operators are unreachable.
func (d *Discovery) Run(ctx context.Context, l *LB) error {
	if d.Client == nil {
		d.Client = &http.Client{Timeout: 5 * time.Second}
	}
	var last []string
	for {
		if len(d.Operators) > 0 {
			hosts, err := d.Fetch(ctx)
			if err != nil {
				l.log.Warn("edge discovery failed; keeping last known backends", "err", err)
			} else {
				last = hosts
			}
		}
		all := append(slices.Clone(d.Static), last...)
		slices.Sort(all)
		l.SetBackends(slices.Compact(all))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(d.Interval):
		}
	}
}
