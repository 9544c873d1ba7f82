package lb

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	accepted  prometheus.Counter
	active    prometheus.Gauge
	bytes     *prometheus.CounterVec
	errors    *prometheus.CounterVec
	backendUp *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		accepted:  prometheus.NewCounter(prometheus.CounterOpts{Name: "zeitwork_load_balancer_connections_accepted_total", Help: "Client connections accepted."}),
		active:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "zeitwork_load_balancer_connections_active", Help: "Connections being relayed."}),
		bytes:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_load_balancer_bytes_total", Help: "Bytes relayed (in = client to backend)."}, []string{"direction"}),
		errors:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_load_balancer_errors_total", Help: "Relay errors by kind."}, []string{"kind"}),
		backendUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "zeitwork_load_balancer_backend_up", Help: "1 when the backend receives new connections."}, []string{"backend"}),
	}
	if reg != nil {
		reg.MustRegister(m.accepted, m.active, m.bytes, m.errors, m.backendUp)
	}
	return m
}
