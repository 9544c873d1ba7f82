package geodns

import (
	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the server's Prometheus series. Label values are bounded:
// query types and rcodes by fixed lists, regions by the configuration.
type metrics struct {
	s         *Server
	queries   *prometheus.CounterVec
	geo       *prometheus.CounterVec
	truncated prometheus.Counter
	reloads   *prometheus.CounterVec
	panics    prometheus.Counter
	malformed prometheus.Counter

	regionHealthy *prometheus.Desc
	lbUp          *prometheus.Desc
	configLoaded  *prometheus.Desc
}

func newMetrics(s *Server) *metrics {
	return &metrics{
		s: s,
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeitwork_dns_queries_total",
			Help: "DNS queries answered, by query type, response code and the client's region (default: in no region's subnets).",
		}, []string{"qtype", "rcode", "region"}),
		geo: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeitwork_dns_geo_answers_total",
			Help: "Geo answers by the client's region and the region answered; they differ while a region fails over.",
		}, []string{"client_region", "answer_region"}),
		truncated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "zeitwork_dns_truncated_total",
			Help: "UDP answers truncated (TC set) because they exceeded the client's payload size; the client retries over TCP.",
		}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeitwork_dns_config_reloads_total",
			Help: "Configuration reloads by result (ok, error: rejected, the previous configuration stays).",
		}, []string{"result"}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "zeitwork_dns_handler_panics_total",
			Help: "Queries whose handling panicked (answered SERVFAIL).",
		}),
		malformed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "zeitwork_dns_malformed_total",
			Help: "Packets that did not parse as a DNS query (answered FORMERR when the header parsed, else dropped).",
		}),
		regionHealthy: prometheus.NewDesc("zeitwork_dns_region_healthy",
			"1 when at least one of the region's load balancers passes its health check, else 0 (the region is not answered).", []string{"region"}, nil),
		lbUp: prometheus.NewDesc("zeitwork_dns_load_balancer_up",
			"1 when the load balancer passes its health check, else 0.", []string{"region", "address"}, nil),
		configLoaded: prometheus.NewDesc("zeitwork_dns_config_loaded_timestamp_seconds",
			"Unix time the current configuration was loaded.", nil, nil),
	}
}

func (m *metrics) register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.queries, m.geo, m.truncated, m.reloads, m, m.panics, m.malformed} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	m.reloads.WithLabelValues("ok")
	m.reloads.WithLabelValues("error")
	return nil
}

// Describe implements prometheus.Collector for the health series.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.regionHealthy
	ch <- m.lbUp
	ch <- m.configLoaded
}

// Collect reads the health state at scrape time, so regions removed by a
// reload disappear from the series.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	for name, r := range m.s.Regions() {
		ch <- prometheus.MustNewConstMetric(m.regionHealthy, prometheus.GaugeValue, b2f(r.Healthy), name)
		for _, l := range r.LoadBalancers {
			ch <- prometheus.MustNewConstMetric(m.lbUp, prometheus.GaugeValue, b2f(l.Up), name, l.Address)
		}
	}
	ch <- prometheus.MustNewConstMetric(m.configLoaded, prometheus.GaugeValue, float64(m.s.loaded.Load()))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

var qtypeLabel = map[uint16]string{
	dns.TypeA: "A", dns.TypeAAAA: "AAAA", dns.TypeCNAME: "CNAME", dns.TypeSOA: "SOA", dns.TypeNS: "NS",
	dns.TypeTXT: "TXT", dns.TypeMX: "MX", dns.TypeANY: "ANY", dns.TypePTR: "PTR", dns.TypeSRV: "SRV",
	dns.TypeCAA: "CAA", dns.TypeHTTPS: "HTTPS", dns.TypeSVCB: "SVCB", dns.TypeDS: "DS", dns.TypeDNSKEY: "DNSKEY",
	dns.TypeAXFR: "AXFR", dns.TypeIXFR: "IXFR",
}

var rcodeLabel = map[int]string{
	dns.RcodeSuccess: "NOERROR", dns.RcodeNameError: "NXDOMAIN", dns.RcodeRefused: "REFUSED",
	dns.RcodeFormatError: "FORMERR", dns.RcodeServerFailure: "SERVFAIL", dns.RcodeNotImplemented: "NOTIMP",
	dns.RcodeBadVers: "BADVERS",
}

func (m *metrics) observe(req, resp *dns.Msg, out outcome) {
	qt := "none"
	if len(req.Question) > 0 {
		if qt = qtypeLabel[req.Question[0].Qtype]; qt == "" {
			qt = "other"
		}
	}
	rc := rcodeLabel[resp.Rcode]
	if rc == "" {
		rc = "other"
	}
	m.queries.WithLabelValues(qt, rc, out.clientRegion).Inc()
	if out.geoRegion != "" {
		m.geo.WithLabelValues(out.clientRegion, out.geoRegion).Inc()
	}
}
