package edge

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// certExpiry is zeitwork_edge_proxy_certificate_expiry_seconds{name}:
// the seconds until each certificate the edge serves expires, computed at
// scrape time from the certificate's NotAfter (a value set once at load
// would stand still while the certificate ages). name is "wildcard" for
// the static certificate and "acme" for the earliest-expiring ACME
// certificate in the cache (one series, however many custom domains).
type certExpiry struct {
	desc *prometheus.Desc

	mu       sync.Mutex
	notAfter map[string]time.Time
	acme     func() (time.Time, bool)
}

var _ prometheus.Collector = (*certExpiry)(nil)

func newCertExpiry() *certExpiry {
	return &certExpiry{
		desc: prometheus.NewDesc("zeitwork_edge_proxy_certificate_expiry_seconds",
			"Seconds until a served certificate expires (name: wildcard, the static certificate; acme, the earliest-expiring cached ACME certificate).",
			[]string{"name"}, nil),
		notAfter: map[string]time.Time{},
	}
}

func (c *certExpiry) set(name string, notAfter time.Time) {
	c.mu.Lock()
	c.notAfter[name] = notAfter
	c.mu.Unlock()
}

func (c *certExpiry) setACME(f func() (time.Time, bool)) {
	c.mu.Lock()
	c.acme = f
	c.mu.Unlock()
}

func (c *certExpiry) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *certExpiry) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	all := make(map[string]time.Time, len(c.notAfter)+1)
	for k, v := range c.notAfter {
		all[k] = v
	}
	acme := c.acme
	c.mu.Unlock()
	if acme != nil {
		if t, ok := acme(); ok {
			all["acme"] = t
		}
	}
	for name, t := range all {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, time.Until(t).Seconds(), name)
	}
}
