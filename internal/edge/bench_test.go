package edge

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/devcluster"
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
	p := New(Config{AppsDomain: "zeitwork.test", ClusterToken: token, RateRPS: 1e9, RateBurst: 1e9, TryTimeout: 3 * time.Second, Region: "here"}, routes, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
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

// BenchmarkFastPath measures the fast path alone, over plain HTTP and
// over TLS: a raw client sends requests one at a time on a keep-alive
// connection to a front, and a raw node answers each with a fixed 128-byte
// response, so the allocations reported are the edge's.
func BenchmarkFastPath(b *testing.B) {
	b.Run("http", func(b *testing.B) { benchFastPath(b, false) })
	b.Run("https", func(b *testing.B) { benchFastPath(b, true) })
}

func benchFastPath(b *testing.B, useTLS bool) {
	nodeLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer nodeLn.Close()
	answer := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nDate: Sun, 29 Nov 2026 06:00:00 GMT\r\nContent-Length: 128\r\n\r\n" + strings.Repeat("z", 128))
	go func() { // ends when nodeLn is closed
		for {
			c, err := nodeLn.Accept()
			if err != nil {
				return
			}
			go func() { // ends when the edge closes its connection
				defer c.Close()
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					for range bytes.Count(buf[:n], []byte("\r\n\r\n")) {
						if _, err := c.Write(answer); err != nil {
							return
						}
					}
				}
			}()
		}
	}()
	routes := routetable.New(routetable.Options{})
	routes.Set(&routetable.Table{Version: "1", Routes: []routetable.Route{{Host: "web-abc1234-acme.zeitwork.test", Kind: "versioned", DeploymentID: "d1",
		Instances: []routetable.Instance{{ID: "i1", NodeAddress: "http://" + nodeLn.Addr().String(), Healthy: true}}}}})
	log := slog.New(slog.DiscardHandler)
	p := New(Config{AppsDomain: "zeitwork.test", ClusterToken: token, RateRPS: 1e9, RateBurst: 1e9, TryTimeout: 3 * time.Second, Region: "here"}, routes, prometheus.NewRegistry(), log)
	srv := &http.Server{Handler: p}
	var tlsCfg *tls.Config
	var clientCfg *tls.Config
	if useTLS {
		ca, err := devcluster.EnsureCA(filepath.Join(b.TempDir(), "ca"), "zeitwork.test")
		if err != nil {
			b.Fatal(err)
		}
		pair, err := tls.LoadX509KeyPair(ca.WildcardCert, ca.WildcardKey)
		if err != nil {
			b.Fatal(err)
		}
		tlsCfg = TLSConfig(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &pair, nil })
		clientCfg = &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}}
	}
	f := newFront(p, tlsCfg, srv, func(*routetable.Route, []byte) bool { return true }, log)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.serve(ctx, ln, time.Second) }()
	defer func() { cancel(); <-done }()
	var c net.Conn
	if useTLS {
		c, err = tls.Dial("tcp", ln.Addr().String(), clientCfg)
	} else {
		c, err = net.Dial("tcp", ln.Addr().String())
	}
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	req := []byte("GET / HTTP/1.1\r\nHost: web-abc1234-acme.zeitwork.test\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n")
	buf := make([]byte, 64<<10)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		got := 0
		for {
			n, err := c.Read(buf[got:])
			if err != nil {
				b.Fatal(err)
			}
			got += n
			if i := bytes.Index(buf[:got], []byte("\r\n\r\n")); i >= 0 && got >= i+4+128 {
				break
			}
		}
	}
}
