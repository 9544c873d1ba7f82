package geodns

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// BenchmarkRespond measures the query handler alone (a geo answer).
func BenchmarkRespond(b *testing.B) {
	c, err := LoadFile(exampleConfig)
	if err != nil {
		b.Fatal(err)
	}
	d, err := compile(c, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	req := new(dns.Msg).SetQuestion("web-abc1234-acme.zeitwork.app.", dns.TypeA)
	src := netip.MustParseAddr("10.2.3.4")
	up := func(string) bool { return true }
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if m, _ := d.respond(req, src, up, uint32(i)); len(m.Answer) != 3 {
			b.Fatal(m)
		}
	}
}

// BenchmarkUDP measures queries over loopback UDP against a running
// server, from 4 concurrent clients.
func BenchmarkUDP(b *testing.B) {
	// A load balancer that accepts TCP: the check target.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	h := ln.Addr().String()
	c := &Config{
		TTL:     30,
		Zones:   []Zone{{Name: "zeitwork.test", NS: []string{"ns1.zeitwork.test"}}},
		Geo:     []GeoName{{Name: "edge.zeitwork.test"}},
		Regions: []Region{{Name: "a", Subnets: []string{"127.0.0.0/8"}, LoadBalancers: []LoadBalancer{{Address: "10.1.0.1", Check: h}, {Address: "10.1.0.2", Check: h}}}},
		Health:  Health{Check: "tcp", Interval: Duration(time.Second), Timeout: Duration(time.Second)},
	}
	s, err := New(c, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Listen("127.0.0.1:0"); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()

	const clients = 4
	b.ResetTimer()
	var wg sync.WaitGroup
	per := b.N/clients + 1
	for range clients {
		wg.Go(func() {
			conn, err := dns.Dial("udp", s.Addr())
			if err != nil {
				b.Error(err)
				return
			}
			defer conn.Close()
			m := new(dns.Msg).SetQuestion("edge.zeitwork.test.", dns.TypeA)
			for i := 0; i < per; i++ {
				m.Id = uint16(i)
				_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
				if err := conn.WriteMsg(m); err != nil {
					b.Error(err)
					return
				}
				r, err := conn.ReadMsg()
				if err != nil || len(r.Answer) != 2 {
					b.Errorf("answer %v %v", r, err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "queries/s")
}
