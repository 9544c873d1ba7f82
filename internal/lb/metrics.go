package lb

import (
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// metrics are the zeitwork_load_balancer_* series. Label children used on
// the connection path are resolved once here, not per connection.
type metrics struct {
	accepted prometheus.Counter
	active   prometheus.Gauge
	bytesIn  prometheus.Counter
	bytesOut prometheus.Counter

	errAccept, errConnect, errNoBackend, errProxyHeader prometheus.Counter

	backendUp     *prometheus.GaugeVec
	backendActive *prometheus.GaugeVec
	backendTotal  sampledCounters
	backendFails  sampledCounters
	healthChecks  *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_load_balancer_bytes_total", Help: "Bytes relayed; direction in is client to backend, out is backend to client."}, []string{"direction"})
	errs := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_load_balancer_errors_total", Help: "Connection errors by kind: accept, connect (one backend refused or timed out), no_backend (client dropped: no backend left to try), proxy_header."}, []string{"kind"})
	m := &metrics{
		accepted:       prometheus.NewCounter(prometheus.CounterOpts{Name: "zeitwork_load_balancer_connections_accepted_total", Help: "Client connections accepted."}),
		active:         prometheus.NewGauge(prometheus.GaugeOpts{Name: "zeitwork_load_balancer_connections_active", Help: "Connections being relayed to a backend."}),
		bytesIn:        bytes.WithLabelValues("in"),
		bytesOut:       bytes.WithLabelValues("out"),
		errAccept:      errs.WithLabelValues("accept"),
		errConnect:     errs.WithLabelValues("connect"),
		errNoBackend:   errs.WithLabelValues("no_backend"),
		errProxyHeader: errs.WithLabelValues("proxy_header"),
		backendUp:      prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "zeitwork_load_balancer_backend_up", Help: "1 when the backend receives new connections (healthy and not drained)."}, []string{"listener", "backend"}),
		backendActive:  prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "zeitwork_load_balancer_backend_connections_active", Help: "Open connections per backend (sampled at each health-check round)."}, []string{"listener", "backend"}),
		backendTotal:   newSampledCounters("zeitwork_load_balancer_backend_connections_total", "Connections relayed per backend since it was added (sampled at each health-check round).", "listener", "backend"),
		backendFails:   newSampledCounters("zeitwork_load_balancer_backend_connect_failures_total", "Failed connects per backend since it was added (sampled at each health-check round).", "listener", "backend"),
		healthChecks:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_load_balancer_health_checks_total", Help: "Active health checks by result (ok, failed)."}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.accepted, m.active, bytes, errs, m.backendUp, m.backendActive, m.backendTotal, m.backendFails, m.healthChecks)
	}
	return m
}

// sampledCounters is a counter family whose values are copied from
// counters kept elsewhere (the backends' atomics, Set at each health-check
// round): it is written like a GaugeVec and exposed with the counter type,
// which its values are (monotonic; a backend added again starts from 0).
type sampledCounters struct {
	*prometheus.GaugeVec
	desc   *prometheus.Desc
	labels []string
}

func newSampledCounters(name, help string, labels ...string) sampledCounters {
	return sampledCounters{
		GaugeVec: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels),
		desc:     prometheus.NewDesc(name, help, labels, nil),
		labels:   labels,
	}
}

func (s sampledCounters) Describe(ch chan<- *prometheus.Desc) { ch <- s.desc }

func (s sampledCounters) Collect(ch chan<- prometheus.Metric) {
	gauges := make(chan prometheus.Metric, 16)
	go func() { // ends when the GaugeVec has collected
		s.GaugeVec.Collect(gauges)
		close(gauges)
	}()
	for g := range gauges {
		var m dto.Metric
		if g.Write(&m) != nil {
			continue
		}
		byName := map[string]string{}
		for _, l := range m.GetLabel() {
			byName[l.GetName()] = l.GetValue()
		}
		values := make([]string, len(s.labels))
		for i, l := range s.labels {
			values[i] = byName[l]
		}
		ch <- prometheus.MustNewConstMetric(s.desc, prometheus.CounterValue, m.GetGauge().GetValue(), values...)
	}
}
