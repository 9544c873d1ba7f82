package topology

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/zeitwork/zeitwork/internal/fsutil"
)

// The GeoDNS configuration (internal/geodns, DNS_CONFIG) the topology
// writes: edge.<zone> and *.<apps domain> answered with the client's
// region's healthy load balancers, db.internal.<zone> pointing at the
// PostgreSQL host.
type dnsConfig struct {
	TTL     uint32      `json:"ttl"`
	Zones   []dnsZone   `json:"zones"`
	Geo     []dnsGeo    `json:"geo"`
	Records []dnsRecord `json:"records"`
	Regions []dnsRegion `json:"regions"`
	Health  dnsHealth   `json:"health"`
}

type dnsZone struct {
	Name string   `json:"name"`
	NS   []string `json:"ns"`
}

type dnsGeo struct {
	Name string `json:"name"`
}

type dnsRecord struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	Value string `json:"value"`
	TTL   uint32 `json:"ttl,omitempty"`
}

type dnsLB struct {
	Address string `json:"address"`
	Check   string `json:"check,omitempty"`
}

type dnsRegion struct {
	Name          string   `json:"name"`
	Subnets       []string `json:"subnets"`
	LoadBalancers []dnsLB  `json:"load_balancers"`
	Fallback      []string `json:"fallback,omitempty"`
}

type dnsHealth struct {
	Check    string `json:"check"`
	Port     int    `json:"port"`
	Path     string `json:"path,omitempty"`
	Interval string `json:"interval"`
	Timeout  string `json:"timeout"`
	Fall     int    `json:"fall"`
	Rise     int    `json:"rise"`
}

// DNSConfig returns the GeoDNS configuration of the layout with
// db.internal.<zone> at dbIP and answers of ttl.
func (l *Layout) DNSConfig(zone, appsDomain, dbIP string, ttl time.Duration) ([]byte, error) {
	c := dnsConfig{
		TTL:   uint32(ttl / time.Second),
		Zones: []dnsZone{{Name: zone, NS: []string{"ns1." + zone}}},
		Geo:   []dnsGeo{{Name: "edge." + zone}, {Name: "*." + appsDomain}},
		Records: []dnsRecord{
			{Name: "db.internal." + zone, Type: "A", Value: dbIP, TTL: 1},
			{Name: "ns1." + zone, Type: "A", Value: l.Regions[0].Of(RoleDNS)[0].IP},
		},
		// Down after 2 failed checks (timeout 750 ms, 750 ms between
		// rounds): within about 3.2 s, so answers age out within the TTL.
		// A probe to the farthest region costs two round trips (80 ms
		// each) on a fresh connection; the timeout leaves room for hosts
		// busy booting microVMs (400 ms marked whole regions down for a
		// moment under a deploy's load).
		Health: dnsHealth{Check: "http", Port: 8084, Path: "/health/ready", Interval: "750ms", Timeout: "750ms", Fall: 2, Rise: 2},
	}
	for i, r := range l.Regions {
		dr := dnsRegion{Name: r.Name, Subnets: []string{r.Subnet}}
		for _, w := range r.Of(RoleWorker) {
			dr.LoadBalancers = append(dr.LoadBalancers, dnsLB{Address: w.IP})
		}
		// Fallback: the other regions, nearest (smallest link delay) first.
		for _, j := range l.byDistance(i) {
			dr.Fallback = append(dr.Fallback, l.Regions[j].Name)
		}
		c.Regions = append(c.Regions, dr)
	}
	return json.MarshalIndent(c, "", "  ")
}

// byDistance lists the other regions by round trip from region i.
func (l *Layout) byDistance(i int) []int {
	var out []int
	for j := range l.Regions {
		if j != i {
			out = append(out, j)
		}
	}
	for a := 1; a < len(out); a++ {
		for b := a; b > 0 && l.Regions[out[b]].Delay < l.Regions[out[b-1]].Delay; b-- {
			out[b], out[b-1] = out[b-1], out[b]
		}
	}
	return out
}

func (t *Topology) writeDNSConfig() error {
	b, err := t.Layout.DNSConfig(t.cfg.Zone, t.cfg.AppsDomain, t.DBHost.IP, t.cfg.DNSTTL)
	if err != nil {
		return err
	}
	return fsutil.WriteFile(t.dnsConfig, b, 0o644)
}

// startDNS starts each region's GeoDNS server.
func (t *Topology) startDNS(ctx context.Context) error {
	t.dnsConfig = filepath.Join(t.cfg.StateDir, "dns", "geodns.json")
	if err := os.MkdirAll(filepath.Dir(t.dnsConfig), 0o755); err != nil {
		return err
	}
	if err := t.writeDNSConfig(); err != nil {
		return err
	}
	return t.startAll(ctx, t.Layout.All(RoleDNS), func(ctx context.Context, h *Host) error {
		p := t.proc(h.Name, "dns-"+strings.TrimPrefix(h.Name, Prefix), t.bin("zeitwork-dns"), map[string]string{
			"DNS_LISTEN":     h.IP + ":53",
			"DNS_ADMIN_ADDR": h.IP + ":8086",
			"DNS_CONFIG":     t.dnsConfig,
			"LOG_LEVEL":      "info",
			"ENVIRONMENT":    "development",
		}, "http://"+h.IP+":8086/health/live")
		t.mu.Lock()
		t.DNS[h.Name] = p
		t.mu.Unlock()
		return p.Start(ctx, time.Minute)
	})
}

// reloadDNS rewrites the configuration and makes every GeoDNS server
// reload it (SIGHUP).
func (t *Topology) reloadDNS() error {
	if err := t.writeDNSConfig(); err != nil {
		return err
	}
	for name, p := range t.DNS {
		if err := p.Signal(syscall.SIGHUP); err != nil {
			return fmt.Errorf("cannot reload GeoDNS on %s: %w", name, err)
		}
	}
	return nil
}
