// Package dnstest is an authoritative DNS server on loopback UDP whose
// answers a test controls (A, TXT and CNAME), for domain verification
// tests. UDP only: it never needs a TCP port to match a UDP one.
package dnstest

import (
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"
)

// Server answers from what Set* stored.
type Server struct {
	Addr string
	mu   sync.Mutex
	a    map[string]string
	txt  map[string][]string
	cn   map[string]string
}

// Start serves until the test ends.
func Start(t testing.TB) *Server {
	s := &Server{a: map[string]string{}, txt: map[string][]string{}, cn: map[string]string{}}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.Addr = pc.LocalAddr().String()
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(s.serve)}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.ActivateAndServe() }()
	t.Cleanup(func() { _ = srv.Shutdown(); <-done })
	return s
}

func fqdn(s string) string { return dns.Fqdn(strings.ToLower(s)) }

// SetA answers name with an IPv4 address.
func (s *Server) SetA(name, ip string) { s.mu.Lock(); s.a[fqdn(name)] = ip; s.mu.Unlock() }

// SetTXT answers name with the values.
func (s *Server) SetTXT(name string, v ...string) { s.mu.Lock(); s.txt[fqdn(name)] = v; s.mu.Unlock() }

// SetCNAME answers name with a CNAME to target.
func (s *Server) SetCNAME(name, target string) {
	s.mu.Lock()
	s.cn[fqdn(name)] = fqdn(target)
	s.mu.Unlock()
}

func (s *Server) serve(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, q := range r.Question {
		name := strings.ToLower(q.Name)
		hdr := dns.RR_Header{Name: q.Name, Class: dns.ClassINET, Ttl: 1}
		if target, ok := s.cn[name]; ok && q.Qtype != dns.TypeTXT {
			hdr.Rrtype = dns.TypeCNAME
			m.Answer = append(m.Answer, &dns.CNAME{Hdr: hdr, Target: target})
			continue
		}
		switch q.Qtype {
		case dns.TypeA:
			if ip, ok := s.a[name]; ok {
				hdr.Rrtype = dns.TypeA
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: net.ParseIP(ip)})
			}
		case dns.TypeTXT:
			for _, v := range s.txt[name] {
				h := hdr
				h.Rrtype = dns.TypeTXT
				m.Answer = append(m.Answer, &dns.TXT{Hdr: h, Txt: []string{v}})
			}
		}
	}
	_ = w.WriteMsg(m)
}
