package geodns

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// healthEndpoint is a load balancer's admin endpoint: a real HTTP server
// on loopback that answers /health/ready 200, or 503 while failing, and
// that can be stopped and started again on the same address.
type healthEndpoint struct {
	t       *testing.T
	addr    string
	failing atomic.Bool
	hits    atomic.Int64
	srv     *http.Server
	done    chan struct{}
}

func newHealthEndpoint(t *testing.T) *healthEndpoint {
	t.Helper()
	h := &healthEndpoint{t: t}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = ln.Addr().String()
	h.serve(ln)
	t.Cleanup(h.stop)
	return h
}

func (h *healthEndpoint) serve(ln net.Listener) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health/ready", func(w http.ResponseWriter, r *http.Request) {
		h.hits.Add(1)
		if h.failing.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, `{"status":"healthy"}`)
	})
	h.srv = &http.Server{Handler: mux}
	h.done = make(chan struct{})
	go func() { defer close(h.done); _ = h.srv.Serve(ln) }()
}

// stop closes the listener: the load balancer is gone.
func (h *healthEndpoint) stop() {
	if h.srv == nil {
		return
	}
	_ = h.srv.Close()
	<-h.done
	h.srv = nil
}

// start listens again on the same address.
func (h *healthEndpoint) start() {
	h.t.Helper()
	var ln net.Listener
	var err error
	for range 50 {
		if ln, err = net.Listen("tcp", h.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		h.t.Fatalf("restart health endpoint on %s: %v", h.addr, err)
	}
	h.serve(ln)
}

// testServer is a running Server on loopback.
type testServer struct {
	*Server
	addr string
	reg  *prometheus.Registry
}

func startServer(t *testing.T, c *Config) *testServer {
	t.Helper()
	reg := prometheus.NewRegistry()
	s, err := New(c, reg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Listen("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	waitFor(t, 10*time.Second, "first health round", func() bool { return s.Ready() == nil })
	return &testServer{Server: s, addr: s.Addr(), reg: reg}
}

// gather returns every counter and gauge by `name{label="value",…}`.
func (s *testServer) gather(t *testing.T) map[string]float64 {
	t.Helper()
	mfs, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			if len(m.GetLabel()) > 0 {
				var ls []string
				for _, l := range m.GetLabel() {
					ls = append(ls, l.GetName()+"="+strconv.Quote(l.GetValue()))
				}
				key += "{" + strings.Join(ls, ",") + "}"
			}
			switch {
			case m.Counter != nil:
				out[key] = m.Counter.GetValue()
			case m.Gauge != nil:
				out[key] = m.Gauge.GetValue()
			}
		}
	}
	return out
}

func (s *testServer) metric(t *testing.T, key string) float64 {
	t.Helper()
	return s.gather(t)[key]
}

func waitFor(t *testing.T, timeout time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// query sends m over network from a loopback source address (127.0.0.1
// unless src is set).
func query(t *testing.T, addr, network string, m *dns.Msg) *dns.Msg {
	t.Helper()
	r, err := exchange(addr, network, "", m)
	if err != nil {
		t.Fatalf("query %v over %s: %v", m.Question, network, err)
	}
	return r
}

func exchange(addr, network, src string, m *dns.Msg) (*dns.Msg, error) {
	c := &dns.Client{Net: network, Timeout: 5 * time.Second, UDPSize: 65535}
	if src != "" {
		if network == "tcp" {
			c.Dialer = &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
		} else {
			c.Dialer = &net.Dialer{LocalAddr: &net.UDPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
		}
	}
	r, _, err := c.Exchange(m, addr)
	return r, err
}

func q(name string, qtype uint16) *dns.Msg { return new(dns.Msg).SetQuestion(name, qtype) }

// addrs returns the A/AAAA values of r's answer, sorted.
func addrs(r *dns.Msg) []string {
	var out []string
	for _, rr := range r.Answer {
		switch rr := rr.(type) {
		case *dns.A:
			out = append(out, rr.A.String())
		case *dns.AAAA:
			out = append(out, rr.AAAA.String())
		}
	}
	slices.Sort(out)
	return out
}

func lbAt(addr string, h *healthEndpoint) LoadBalancer {
	return LoadBalancer{Address: addr, Check: h.addr}
}

// threeRegions is a platform with three regions of two load balancers
// each; clients in 127.0.0.0/8 are in east, 10.2.0.0/16 in west,
// 10.3.0.0/16 and 2001:db8:3::/48 in south.
type threeRegions struct {
	cfg                    *Config
	e1, e2, w1, w2, s1, s2 *healthEndpoint
}

func newThreeRegions(t *testing.T, ttl uint32) *threeRegions {
	p := &threeRegions{}
	p.e1, p.e2, p.w1, p.w2, p.s1, p.s2 = newHealthEndpoint(t), newHealthEndpoint(t), newHealthEndpoint(t), newHealthEndpoint(t), newHealthEndpoint(t), newHealthEndpoint(t)
	p.cfg = &Config{
		TTL:         ttl,
		NegativeTTL: 7,
		Zones:       []Zone{{Name: "zeitwork.test", NS: []string{"ns1.zeitwork.test", "ns2.zeitwork.test"}, Serial: 42}},
		Geo: []GeoName{
			{Name: "edge.zeitwork.test"},
			{Name: "*.zeitwork.test"},
			{Name: "west.zeitwork.test", Region: "west"},
		},
		Records: []Record{
			{Name: "ns1.zeitwork.test", Type: "A", Value: "127.0.0.53"},
			{Name: "ns2.zeitwork.test", Type: "A", Value: "127.0.0.54"},
			{Name: "db.internal.zeitwork.test", Type: "A", Value: "10.9.0.1", TTL: 5},
			{Name: "www.zeitwork.test", Type: "CNAME", Value: "edge.zeitwork.test"},
			{Name: "docs.zeitwork.test", Type: "CNAME", Value: "zeitwork.github.example"},
			{Name: "dangling.zeitwork.test", Type: "CNAME", Value: "gone.internal.zeitwork.test"},
			{Name: "edge.zeitwork.test", Type: "TXT", Value: "v=geo"},
		},
		Regions: []Region{
			{Name: "east", Subnets: []string{"127.0.0.0/8"}, LoadBalancers: []LoadBalancer{lbAt("10.1.0.1", p.e1), lbAt("10.1.0.2", p.e2)}, Fallback: []string{"west", "south"}},
			{Name: "west", Subnets: []string{"10.2.0.0/16"}, LoadBalancers: []LoadBalancer{lbAt("10.2.0.1", p.w1), lbAt("2001:db8:2::1", p.w2)}, Fallback: []string{"south"}},
			{Name: "south", Subnets: []string{"10.3.0.0/16", "2001:db8:3::/48"}, LoadBalancers: []LoadBalancer{lbAt("10.3.0.1", p.s1), lbAt("10.3.0.2", p.s2)}, Fallback: []string{"west", "east"}},
		},
		DefaultOrder: []string{"south", "east", "west"},
		// Generous timeouts: a loaded machine must not fail a healthy
		// load balancer. Tests of failover use a short TTL and checks
		// fast enough to fit it.
		Health: Health{Check: "http", Path: "/health/ready", Interval: Duration(time.Second), Timeout: Duration(time.Second), Fall: 3, Rise: 1},
	}
	if ttl < 30 {
		p.cfg.Health.Interval, p.cfg.Health.Timeout, p.cfg.Health.Fall, p.cfg.Health.Rise = Duration(500*time.Millisecond), Duration(500*time.Millisecond), 2, 2
	}
	return p
}

// TestSemantics checks the DNS answers: authority, NXDOMAIN vs NODATA
// with the SOA, REFUSED outside the zones, wildcards per RFC 4592, CNAME
// chains, case, EDNS and odd classes, types and opcodes.
func TestSemantics(t *testing.T) {
	p := newThreeRegions(t, 30)
	s := startServer(t, p.cfg)
	east := []string{"10.1.0.1", "10.1.0.2"}
	type want struct {
		rcode  int
		addrs  []string
		answer []uint16 // answer types in order, when set
		soa    bool     // SOA in authority
		aa     bool
	}
	cases := []struct {
		name  string
		qtype uint16
		want  want
	}{
		{"edge.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, addrs: east, aa: true}},
		{"EdGe.ZeitWork.TEST.", dns.TypeA, want{rcode: dns.RcodeSuccess, addrs: east, aa: true}},
		{"edge.zeitwork.test.", dns.TypeAAAA, want{rcode: dns.RcodeSuccess, soa: true, aa: true}}, // east has no IPv6 LB: NODATA
		{"edge.zeitwork.test.", dns.TypeTXT, want{rcode: dns.RcodeSuccess, answer: []uint16{dns.TypeTXT}, aa: true}},
		{"edge.zeitwork.test.", dns.TypeMX, want{rcode: dns.RcodeSuccess, soa: true, aa: true}},
		{"web-abc1234-acme.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, addrs: east, aa: true}},
		{"a.b.c.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, addrs: east, aa: true}},
		{"west.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, addrs: []string{"10.2.0.1"}, aa: true}},
		{"west.zeitwork.test.", dns.TypeAAAA, want{rcode: dns.RcodeSuccess, addrs: []string{"2001:db8:2::1"}, aa: true}},
		{"x.edge.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeNameError, soa: true, aa: true}},
		// internal.zeitwork.test exists as an empty non-terminal: NODATA,
		// and it stops the wildcard from matching names below it.
		{"internal.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, soa: true, aa: true}},
		{"other.internal.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeNameError, soa: true, aa: true}},
		{"db.internal.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, addrs: []string{"10.9.0.1"}, aa: true}},
		{"db.internal.zeitwork.test.", dns.TypeAAAA, want{rcode: dns.RcodeSuccess, soa: true, aa: true}},
		{"zeitwork.test.", dns.TypeSOA, want{rcode: dns.RcodeSuccess, answer: []uint16{dns.TypeSOA}, aa: true}},
		{"zeitwork.test.", dns.TypeNS, want{rcode: dns.RcodeSuccess, answer: []uint16{dns.TypeNS, dns.TypeNS}, aa: true}},
		{"zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, soa: true, aa: true}},
		{"ns1.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, addrs: []string{"127.0.0.53"}, aa: true}},
		{"www.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, answer: []uint16{dns.TypeCNAME, dns.TypeA, dns.TypeA}, addrs: east, aa: true}},
		{"www.zeitwork.test.", dns.TypeCNAME, want{rcode: dns.RcodeSuccess, answer: []uint16{dns.TypeCNAME}, aa: true}},
		{"docs.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeSuccess, answer: []uint16{dns.TypeCNAME}, aa: true}},
		{"dangling.zeitwork.test.", dns.TypeA, want{rcode: dns.RcodeNameError, answer: []uint16{dns.TypeCNAME}, soa: true, aa: true}},
		{"example.com.", dns.TypeA, want{rcode: dns.RcodeRefused}},
		{"test.", dns.TypeSOA, want{rcode: dns.RcodeRefused}},
		{"zeitwork.test.", dns.TypeAXFR, want{rcode: dns.RcodeRefused}},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%s/%s", c.name, dns.TypeToString[c.qtype]), func(t *testing.T) {
			r := query(t, s.addr, "udp", q(c.name, c.qtype))
			if r.Rcode != c.want.rcode {
				t.Fatalf("rcode %s, want %s\n%v", dns.RcodeToString[r.Rcode], dns.RcodeToString[c.want.rcode], r)
			}
			if r.Authoritative != c.want.aa || r.RecursionAvailable {
				t.Errorf("AA=%v RA=%v, want AA=%v RA=false", r.Authoritative, r.RecursionAvailable, c.want.aa)
			}
			if r.Question[0].Name != c.name {
				t.Errorf("question %q, want the query's spelling %q", r.Question[0].Name, c.name)
			}
			if c.want.addrs != nil && !slices.Equal(addrs(r), c.want.addrs) {
				t.Errorf("addresses %v, want %v", addrs(r), c.want.addrs)
			}
			if c.want.addrs == nil && c.want.answer == nil && len(r.Answer) > 0 {
				t.Errorf("answer %v, want none", r.Answer)
			}
			if c.want.answer != nil {
				var types []uint16
				for _, rr := range r.Answer {
					types = append(types, rr.Header().Rrtype)
				}
				if !slices.Equal(types, c.want.answer) {
					t.Errorf("answer types %v, want %v\n%v", types, c.want.answer, r)
				}
			}
			for _, rr := range r.Answer {
				// The first owner is the query's own spelling (wildcards
				// synthesise it).
				if rr.Header().Name == r.Answer[0].Header().Name && rr.Header().Name != c.name {
					t.Errorf("owner %q, want %q", rr.Header().Name, c.name)
				}
			}
			hasSOA := len(r.Ns) == 1 && r.Ns[0].Header().Rrtype == dns.TypeSOA
			if hasSOA != c.want.soa || (!c.want.soa && len(r.Ns) > 0) {
				t.Fatalf("authority %v, want SOA=%v", r.Ns, c.want.soa)
			}
			if hasSOA {
				soa := r.Ns[0].(*dns.SOA)
				if soa.Hdr.Name != "zeitwork.test." || soa.Serial != 42 || soa.Minttl != 7 || soa.Hdr.Ttl != 7 || soa.Ns != "ns1.zeitwork.test." {
					t.Errorf("SOA %v: want zone apex, serial 42, negative TTL 7", soa)
				}
			}
			for _, rr := range r.Answer {
				if want := uint32(30); rr.Header().Rrtype == dns.TypeA && rr.Header().Name != "db.internal.zeitwork.test." && rr.Header().Ttl != want && rr.Header().Name != "ns1.zeitwork.test." {
					t.Errorf("TTL %d of %v, want %d", rr.Header().Ttl, rr, want)
				}
			}
		})
	}

	t.Run("static TTL", func(t *testing.T) {
		r := query(t, s.addr, "udp", q("db.internal.zeitwork.test.", dns.TypeA))
		if r.Answer[0].Header().Ttl != 5 {
			t.Fatalf("TTL %d, want the record's 5", r.Answer[0].Header().Ttl)
		}
	})
	t.Run("odd queries", func(t *testing.T) {
		m := q("edge.zeitwork.test.", dns.TypeA)
		m.Question[0].Qclass = dns.ClassCHAOS
		if r := query(t, s.addr, "udp", m); r.Rcode != dns.RcodeRefused {
			t.Errorf("class CH: %s, want REFUSED", dns.RcodeToString[r.Rcode])
		}
		m = q("edge.zeitwork.test.", dns.TypeA)
		m.SetEdns0(1232, false)
		m.IsEdns0().SetVersion(1)
		if r := query(t, s.addr, "udp", m); r.Rcode != dns.RcodeBadVers || r.IsEdns0() == nil {
			t.Errorf("EDNS version 1: %s, want BADVERS with an OPT", dns.RcodeToString[r.Rcode])
		}
		m = q("edge.zeitwork.test.", dns.TypeA)
		m.Opcode = dns.OpcodeNotify
		if r := query(t, s.addr, "udp", m); r.Rcode != dns.RcodeNotImplemented {
			t.Errorf("NOTIFY: %s, want NOTIMP", dns.RcodeToString[r.Rcode])
		}
		m = q("edge.zeitwork.test.", dns.TypeA)
		m.SetEdns0(4096, true)
		r := query(t, s.addr, "udp", m)
		if opt := r.IsEdns0(); opt == nil || opt.UDPSize() != ednsUDPSize || len(addrs(r)) != 2 {
			t.Errorf("EDNS answer %v: want an OPT advertising %d", r, ednsUDPSize)
		}
		r = query(t, s.addr, "udp", q("edge.zeitwork.test.", dns.TypeANY))
		if len(addrs(r)) != 2 || r.Rcode != dns.RcodeSuccess {
			t.Errorf("ANY: %v", r)
		}
	})
	if got := s.metric(t, `zeitwork_dns_queries_total{qtype="A",rcode="NXDOMAIN",region="east"}`); got < 2 {
		t.Errorf("zeitwork_dns_queries_total{A,NXDOMAIN,east} = %v, want ≥ 2", got)
	}
}

// TestClientRegion: the client's region comes from EDNS Client Subnet when
// the resolver sends it, else from the packet's source address; clients in
// no subnet get the default order.
func TestClientRegion(t *testing.T) {
	p := newThreeRegions(t, 30)
	s := startServer(t, p.cfg)
	ecs := func(cidr string) *dns.Msg {
		pf := netip.MustParsePrefix(cidr)
		m := q("edge.zeitwork.test.", dns.TypeA)
		m.SetEdns0(1232, false)
		o := &dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: uint8(pf.Bits()), Address: pf.Addr().AsSlice()}
		if pf.Addr().Is6() {
			o.Family = 2
		}
		m.IsEdns0().Option = append(m.IsEdns0().Option, o)
		return m
	}
	cases := []struct {
		what string
		m    *dns.Msg
		src  string
		want []string
	}{
		{"source 127.0.0.1 (east)", q("edge.zeitwork.test.", dns.TypeA), "", []string{"10.1.0.1", "10.1.0.2"}},
		{"source 127.0.0.9 (east)", q("edge.zeitwork.test.", dns.TypeA), "127.0.0.9", []string{"10.1.0.1", "10.1.0.2"}},
		{"ECS 10.2.7.0/24 (west) from an east resolver", ecs("10.2.7.0/24"), "", []string{"10.2.0.1"}},
		{"ECS 10.3.0.0/16 (south)", ecs("10.3.0.0/16"), "", []string{"10.3.0.1", "10.3.0.2"}},
		{"ECS 2001:db8:3:1::/56 (south)", ecs("2001:db8:3:100::/56"), "", []string{"10.3.0.1", "10.3.0.2"}},
		{"ECS 192.0.2.0/24 (no region: default order, south first)", ecs("192.0.2.0/24"), "", []string{"10.3.0.1", "10.3.0.2"}},
		{"ECS 0.0.0.0/0 (resolver opts out: default order)", ecs("0.0.0.0/0"), "", []string{"10.3.0.1", "10.3.0.2"}},
	}
	for _, c := range cases {
		t.Run(c.what, func(t *testing.T) {
			r, err := exchange(s.addr, "udp", c.src, c.m)
			if err != nil {
				t.Fatal(err)
			}
			if got := addrs(r); !slices.Equal(got, c.want) {
				t.Fatalf("answer %v, want %v", got, c.want)
			}
			if sent := c.m.IsEdns0(); sent != nil && len(sent.Option) > 0 {
				in := sent.Option[0].(*dns.EDNS0_SUBNET)
				opt := r.IsEdns0()
				if opt == nil || len(opt.Option) != 1 {
					t.Fatalf("no ECS option echoed: %v", r)
				}
				out := opt.Option[0].(*dns.EDNS0_SUBNET)
				if out.Family != in.Family || out.SourceNetmask != in.SourceNetmask || out.SourceScope != in.SourceNetmask {
					t.Fatalf("ECS echoed %v for %v", out, in)
				}
			}
		})
	}
	// A static answer is the same for every client: scope 0, so the
	// resolver caches it once.
	m := ecs("10.2.7.0/24")
	m.Question[0].Name = "db.internal.zeitwork.test."
	r := query(t, s.addr, "udp", m)
	if o := r.IsEdns0().Option[0].(*dns.EDNS0_SUBNET); o.SourceScope != 0 || o.SourceNetmask != 24 || !slices.Equal(addrs(r), []string{"10.9.0.1"}) {
		t.Fatalf("static answer with ECS: %v", r)
	}
	bad := ecs("10.2.0.0/16")
	bad.IsEdns0().Option[0].(*dns.EDNS0_SUBNET).SourceScope = 8 // must be 0 in a query
	if r := query(t, s.addr, "udp", bad); r.Rcode != dns.RcodeFormatError {
		t.Fatalf("ECS with a scope in the query: %s, want FORMERR", dns.RcodeToString[r.Rcode])
	}
}

// TestFailover: a load balancer that fails its check leaves the answer; a
// region whose load balancers all fail is replaced by the next in its
// fallback order within the TTL; a recovered region comes back after
// rise checks; with every region down the client's region is answered
// (fail open).
func TestFailover(t *testing.T) {
	const ttl = 5
	p := newThreeRegions(t, ttl)
	s := startServer(t, p.cfg)
	edge := func() []string { return addrs(query(t, s.addr, "udp", q("edge.zeitwork.test.", dns.TypeA))) }
	// within waits for edge() to answer want and requires it within the
	// TTL of the change.
	within := func(what string, want ...string) time.Duration {
		t.Helper()
		start := time.Now()
		waitFor(t, 3*ttl*time.Second, what, func() bool { return slices.Equal(edge(), want) })
		took := time.Since(start)
		if took > ttl*time.Second {
			t.Errorf("%s took %s, more than the TTL %ds", what, took, ttl)
		}
		t.Logf("%s: %s", what, took.Round(time.Millisecond))
		return took
	}
	if got := edge(); !slices.Equal(got, []string{"10.1.0.1", "10.1.0.2"}) {
		t.Fatalf("start: %v", got)
	}
	p.e1.stop()
	within("one east LB stopped", "10.1.0.2")
	p.e2.failing.Store(true)
	within("east down (LB 503) → west", "10.2.0.1")
	if v := s.metric(t, `zeitwork_dns_geo_answers_total{answer_region="west",client_region="east"}`); v < 1 {
		t.Errorf("geo answers east→west = %v", v)
	}
	p.w1.stop()
	p.w2.stop()
	within("west down → south", "10.3.0.1", "10.3.0.2")
	if got := addrs(query(t, s.addr, "udp", q("west.zeitwork.test.", dns.TypeA))); !slices.Equal(got, []string{"10.2.0.1"}) {
		t.Errorf("the pinned west name fails open to west's own LBs, got %v", got)
	}
	p.s1.failing.Store(true)
	p.s2.failing.Store(true)
	within("every region down → east answered anyway", "10.1.0.1", "10.1.0.2")
	p.e1.start()
	within("east LB 1 back", "10.1.0.1")
	p.e2.failing.Store(false)
	within("east LB 2 back", "10.1.0.1", "10.1.0.2")

	st := s.Regions()
	if !st["east"].Healthy || st["west"].Healthy || st["south"].Healthy {
		t.Fatalf("region status %+v", st)
	}
	want := map[string]float64{
		`zeitwork_dns_region_healthy{region="east"}`:                      1,
		`zeitwork_dns_region_healthy{region="west"}`:                      0,
		`zeitwork_dns_region_healthy{region="south"}`:                     0,
		`zeitwork_dns_load_balancer_up{address="10.1.0.1",region="east"}`: 1,
		`zeitwork_dns_load_balancer_up{address="10.2.0.1",region="west"}`: 0,
	}
	got := s.gather(t)
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
}

// TestReload: a reload swaps records and regions at once, keeps the health
// state of load balancers that stay (a down one stays down, no flap), and
// a bad configuration is refused with the old one still serving.
func TestReload(t *testing.T) {
	p := newThreeRegions(t, 30)
	s := startServer(t, p.cfg)
	p.e1.failing.Store(true)
	p.e2.failing.Store(true)
	waitFor(t, 30*time.Second, "east down", func() bool {
		return slices.Equal(addrs(query(t, s.addr, "udp", q("edge.zeitwork.test.", dns.TypeA))), []string{"10.2.0.1"})
	})

	// The database moves behind the same name.
	p.cfg.Records[2].Value = "10.9.0.2"
	if err := s.Reload(p.cfg); err != nil {
		t.Fatal(err)
	}
	if got := addrs(query(t, s.addr, "udp", q("db.internal.zeitwork.test.", dns.TypeA))); !slices.Equal(got, []string{"10.9.0.2"}) {
		t.Fatalf("db after reload: %v", got)
	}
	if got := addrs(query(t, s.addr, "udp", q("edge.zeitwork.test.", dns.TypeA))); !slices.Equal(got, []string{"10.2.0.1"}) {
		t.Fatalf("east's down state lost in the reload: edge = %v", got)
	}

	// A new east load balancer: counted up at once, probed at once.
	e3 := newHealthEndpoint(t)
	p.cfg.Regions[0].LoadBalancers = append(p.cfg.Regions[0].LoadBalancers, lbAt("10.1.0.3", e3))
	if err := s.Reload(p.cfg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "new LB probed", func() bool { return e3.hits.Load() > 0 && s.Ready() == nil })
	if got := addrs(query(t, s.addr, "udp", q("edge.zeitwork.test.", dns.TypeA))); !slices.Equal(got, []string{"10.1.0.3"}) {
		t.Fatalf("edge after adding a healthy east LB: %v", got)
	}

	// Bad configurations: refused, nothing changes.
	bad := *p.cfg
	bad.Regions = slices.Clone(p.cfg.Regions)
	bad.Regions[1].Fallback = []string{"nowhere"}
	err := s.Reload(&bad)
	if err == nil || !strings.Contains(err.Error(), `regions[1].fallback[0]: no region "nowhere"`) {
		t.Fatalf("bad reload: %v", err)
	}
	if got := addrs(query(t, s.addr, "udp", q("db.internal.zeitwork.test.", dns.TypeA))); !slices.Equal(got, []string{"10.9.0.2"}) {
		t.Fatalf("db after a refused reload: %v", got)
	}
	if v := s.metric(t, `zeitwork_dns_config_reloads_total{result="error"}`); v != 1 {
		t.Errorf("reloads{error} = %v", v)
	}
	if v := s.metric(t, `zeitwork_dns_config_reloads_total{result="ok"}`); v != 2 {
		t.Errorf("reloads{ok} = %v", v)
	}
}

// TestTruncation: an answer larger than the client's UDP payload size is
// truncated (TC) and complete over TCP.
func TestTruncation(t *testing.T) {
	h := newHealthEndpoint(t)
	var lbs []LoadBalancer
	for i := range 80 {
		lbs = append(lbs, lbAt(fmt.Sprintf("2001:db8::%x", i+1), h))
	}
	c := &Config{
		TTL:     30,
		Zones:   []Zone{{Name: "zeitwork.test", NS: []string{"ns1.zeitwork.test"}}},
		Geo:     []GeoName{{Name: "big.zeitwork.test"}},
		Regions: []Region{{Name: "big", LoadBalancers: lbs}},
		Health:  Health{Check: "http", Interval: Duration(time.Second), Timeout: Duration(500 * time.Millisecond)},
	}
	s := startServer(t, c)
	for _, tc := range []struct {
		what string
		edns uint16
	}{{"no EDNS (512)", 0}, {"EDNS 1232", 1232}, {"EDNS 4096 (capped at 1232)", 4096}} {
		m := q("big.zeitwork.test.", dns.TypeAAAA)
		if tc.edns > 0 {
			m.SetEdns0(tc.edns, false)
		}
		r := query(t, s.addr, "udp", m)
		r.Compress = true // the wire size
		limit := 512
		if tc.edns > 0 {
			limit = ednsUDPSize
		}
		if !r.Truncated || r.Len() > limit || len(r.Answer) >= 80 {
			t.Errorf("%s: TC=%v, %d bytes, %d answers; want TC within %d bytes", tc.what, r.Truncated, r.Len(), len(r.Answer), limit)
		}
	}
	r := query(t, s.addr, "tcp", q("big.zeitwork.test.", dns.TypeAAAA))
	if r.Truncated || len(r.Answer) != 80 {
		t.Fatalf("TCP: TC=%v with %d answers, want all 80", r.Truncated, len(r.Answer))
	}
	if v := s.metric(t, "zeitwork_dns_truncated_total"); v != 3 {
		t.Errorf("truncated = %v, want 3", v)
	}
}

// TestMalformed sends garbage over UDP and TCP; the server keeps
// answering and counts it.
func TestMalformed(t *testing.T) {
	p := newThreeRegions(t, 30)
	s := startServer(t, p.cfg)
	good, _ := q("edge.zeitwork.test.", dns.TypeA).Pack()
	junk := [][]byte{
		{},
		{0x12},
		make([]byte, 12),
		append(slices.Clone(good[:12]), 0xff, 0xff, 0xff),
		append(slices.Clone(good), 0xc0, 0x0c, 0x00),                                   // trailing junk
		{0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1}, // self-pointer name
		[]byte(strings.Repeat("\xff", 600)),
	}
	for _, j := range junk {
		c, err := net.Dial("udp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = c.Write(j)
		c.Close()
		tc, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = tc.Write(append([]byte{byte(len(j) >> 8), byte(len(j))}, j...))
		_ = tc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		_, _ = tc.Read(make([]byte, 512))
		tc.Close()
	}
	for _, network := range []string{"udp", "tcp"} {
		if got := addrs(query(t, s.addr, network, q("edge.zeitwork.test.", dns.TypeA))); len(got) != 2 {
			t.Fatalf("%s after junk: %v", network, got)
		}
	}
	if v := s.metric(t, "zeitwork_dns_malformed_total"); v < 4 {
		t.Errorf("malformed = %v, want ≥ 4", v)
	}
	if v := s.metric(t, "zeitwork_dns_handler_panics_total"); v != 0 {
		t.Errorf("panics = %v", v)
	}
}

// TestTCPCheck: health checks by TCP connect.
func TestTCPCheck(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	dead := newHealthEndpoint(t)
	dead.stop()
	c := &Config{
		TTL:   10,
		Zones: []Zone{{Name: "zeitwork.test", NS: []string{"ns1.zeitwork.test"}}},
		Geo:   []GeoName{{Name: "edge.zeitwork.test"}},
		Regions: []Region{
			{Name: "a", Subnets: []string{"127.0.0.0/8"}, LoadBalancers: []LoadBalancer{{Address: "10.1.0.1", Check: dead.addr}}},
			{Name: "b", LoadBalancers: []LoadBalancer{{Address: "10.2.0.1", Check: ln.Addr().String()}}},
		},
		Health: Health{Check: "tcp", Interval: Duration(500 * time.Millisecond), Timeout: Duration(500 * time.Millisecond), Fall: 1, Rise: 1},
	}
	s := startServer(t, c)
	if got := addrs(query(t, s.addr, "udp", q("edge.zeitwork.test.", dns.TypeA))); !slices.Equal(got, []string{"10.2.0.1"}) {
		t.Fatalf("a's LB refuses connections, b's accepts: got %v", got)
	}
	ln.Close()
	waitFor(t, 20*time.Second, "b down too: fail open to a", func() bool {
		return slices.Equal(addrs(query(t, s.addr, "udp", q("edge.zeitwork.test.", dns.TypeA))), []string{"10.1.0.1"})
	})
}

func TestListenErrors(t *testing.T) {
	p := newThreeRegions(t, 30)
	s, err := New(p.cfg, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Run(t.Context()); err == nil {
		t.Fatal("Run before Listen succeeded")
	}
	busy, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	err = s.Listen(busy.LocalAddr().String())
	if err == nil || !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(err.Error(), "cannot listen on udp") {
		t.Fatalf("Listen on a busy port: %v", err)
	}
}

// TestTCPConnectionLimit: beyond the limit a TCP client waits for a slot
// instead of costing the server another connection; shutdown still ends
// a waiting Accept.
func TestTCPConnectionLimit(t *testing.T) {
	p := newThreeRegions(t, 30)
	s, err := New(p.cfg, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s.maxTCP = 2
	if err := s.Listen("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	// Two idle connections take both slots.
	var idle []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", s.Addr())
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	answered := make(chan error, 1)
	go func() {
		_, err := exchange(s.Addr(), "tcp", "", q("edge.zeitwork.test.", dns.TypeA))
		answered <- err
	}()
	select {
	case err := <-answered:
		t.Fatalf("a third connection was served while two were open (%v)", err)
	case <-time.After(500 * time.Millisecond):
	}
	idle[0].Close()
	select {
	case err := <-answered:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting client was not served after a slot freed")
	}
	// Fill both slots again, so Accept waits, then shut down.
	c, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	defer idle[1].Close()
	time.Sleep(100 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return with Accept waiting for a slot")
	}
}
