package lb

import "github.com/prometheus/client_golang/prometheus"

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
	backendTotal  *prometheus.GaugeVec
	backendFails  *prometheus.GaugeVec
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
		backendTotal:   prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "zeitwork_load_balancer_backend_connections_total", Help: "Connections relayed per backend since it was added (sampled at each health-check round)."}, []string{"listener", "backend"}),
		backendFails:   prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "zeitwork_load_balancer_backend_connect_failures_total", Help: "Failed connects per backend since it was added (sampled at each health-check round)."}, []string{"listener", "backend"}),
		healthChecks:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_load_balancer_health_checks_total", Help: "Active health checks by result (ok, failed)."}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.accepted, m.active, bytes, errs, m.backendUp, m.backendActive, m.backendTotal, m.backendFails, m.healthChecks)
	}
	return m
}
