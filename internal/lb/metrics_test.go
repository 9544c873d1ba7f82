package lb

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestSampledCounters: the per-backend totals are written like gauges and
// exposed as counters with their labels in place.
func TestSampledCounters(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	m := newMetrics(reg)
	m.backendTotal.WithLabelValues("127.0.0.1:8082", "10.0.0.1:443").Set(7)
	m.backendFails.WithLabelValues("127.0.0.1:8082", "10.0.0.1:443").Set(2)
	m.backendTotal.WithLabelValues("127.0.0.1:8082", "10.0.0.2:443").Set(1)
	m.backendTotal.DeleteLabelValues("127.0.0.1:8082", "10.0.0.2:443")
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		got[mf.GetName()] = mf
	}
	for name, want := range map[string]float64{"zeitwork_load_balancer_backend_connections_total": 7, "zeitwork_load_balancer_backend_connect_failures_total": 2} {
		mf := got[name]
		if mf == nil || mf.GetType() != dto.MetricType_COUNTER || len(mf.GetMetric()) != 1 {
			t.Fatalf("%s = %v", name, mf)
		}
		m := mf.GetMetric()[0]
		ls := map[string]string{}
		for _, l := range m.GetLabel() {
			ls[l.GetName()] = l.GetValue()
		}
		if m.GetCounter().GetValue() != want || ls["listener"] != "127.0.0.1:8082" || ls["backend"] != "10.0.0.1:443" {
			t.Errorf("%s: %v", name, m)
		}
	}
}
