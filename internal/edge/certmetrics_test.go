package edge

import (
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// expiries gathers zeitwork_edge_proxy_certificate_expiry_seconds by name
// and the ACME order counters by result from reg.
func expiries(t *testing.T, reg prometheus.Gatherer) (expiry, acme map[string]float64) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	expiry, acme = map[string]float64{}, map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "zeitwork_edge_proxy_certificate_expiry_seconds":
				expiry[m.GetLabel()[0].GetValue()] = m.GetGauge().GetValue()
			case "zeitwork_edge_proxy_acme_certificates_total":
				acme[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
			}
		}
	}
	return expiry, acme
}

// TestCertExpiryCounts down: the gauge is computed at scrape time, so it
// falls as the certificate ages without being loaded again; the ACME
// series comes and goes with the cache's earliest certificate.
func TestCertExpiryCountsDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newCertExpiry()
		reg := prometheus.NewPedanticRegistry()
		reg.MustRegister(c)
		c.set("wildcard", time.Now().Add(20*24*time.Hour))
		got, _ := expiries(t, reg)
		if got["wildcard"] != 20*24*3600 || len(got) != 1 {
			t.Fatalf("expiry = %v", got)
		}
		time.Sleep(7 * 24 * time.Hour)
		if got, _ = expiries(t, reg); got["wildcard"] != 13*24*3600 {
			t.Fatalf("a week later: %v, want 13 days", got)
		}
		var acme time.Time
		c.setACME(func() (time.Time, bool) { return acme, !acme.IsZero() })
		if got, _ = expiries(t, reg); len(got) != 1 {
			t.Fatalf("no ACME certificate yet: %v", got)
		}
		acme = time.Now().Add(-time.Hour)
		if got, _ = expiries(t, reg); got["acme"] != -3600 {
			t.Fatalf("expired ACME certificate: %v", got)
		}
	})
}
