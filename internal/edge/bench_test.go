package edge

import (
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// BenchmarkProxy measures the proxy's per-request cost on keep-alive
// HTTP/1.1: client → proxy → node data plane (a plain backend answering
// 128 bytes). Profile with -cpuprofile to see where the proxy spends.
func BenchmarkProxy(b *testing.B) {
	body := make([]byte, 128)
	node := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write(body) }))
	defer node.Close()
	routes := routetable.New(routetable.Options{})
	routes.Set(&routetable.Table{Version: "1", Routes: []routetable.Route{{Host: "web-abc1234-acme.zeitwork.test", Kind: "versioned", DeploymentID: "d1",
		Instances: []routetable.Instance{{ID: "i1", NodeAddress: node.URL, Healthy: true}}}}})
	p := New(Config{AppsDomain: "zeitwork.test", ClusterToken: token, RateRPS: 1e9, RateBurst: 1e9}, routes, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	front := httptest.NewServer(p)
	defer front.Close()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		req, _ := http.NewRequest("GET", front.URL+"/", nil)
		req.Host = "web-abc1234-acme.zeitwork.test"
		for pb.Next() {
			resp, err := client.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			n, _ := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || n != int64(len(body)) {
				b.Errorf("status %d, %d bytes", resp.StatusCode, n)
				return
			}
		}
	})
}
