// Package acmetest runs the pieces ACME tests need on loopback: Pebble
// (Let's Encrypt's ACME test server) in-process, and a tiny authoritative
// DNS server whose answers the test controls. Nothing leaves the machine.
package acmetest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"github.com/miekg/dns"
)

// Pebble is a running ACME server.
type Pebble struct {
	DirectoryURL string
	// ServerCA is the PEM file that signs Pebble's own HTTPS certificate
	// (ACME clients must trust it).
	ServerCA string
	ca       *ca.CAImpl
}

// IssuerRoots returns the roots of the certificates Pebble issues.
func (p *Pebble) IssuerRoots() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.ca.GetRootCert(0).Cert)
	return pool
}

// StartPebble serves Pebble on loopback; it validates HTTP-01 on httpPort
// and TLS-ALPN-01 on tlsPort of the address dnsAddr resolves names to.
func StartPebble(t testing.TB, httpPort, tlsPort int, dnsAddr string) *Pebble {
	t.Setenv("PEBBLE_VA_NOSLEEP", "1")
	logger := log.New(io.Discard, "", 0)
	store := db.NewMemoryStore()
	c := ca.New(logger, store, "", "ecdsa", 0, 1, map[string]ca.Profile{"default": {Description: "default"}})
	v := va.New(logger, httpPort, tlsPort, false, dnsAddr, store)
	w := wfe.New(logger, store, v, c, nil, false, false, 0, 0)
	dir := t.TempDir()
	cert, caFile := serverCert(t, dir)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: w.Handler(), TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, ErrorLog: logger}
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { srv.Close() })
	return &Pebble{DirectoryURL: "https://" + ln.Addr().String() + "/dir", ServerCA: caFile, ca: c}
}

// serverCert makes a throwaway CA and a certificate for 127.0.0.1.
func serverCert(t testing.TB, dir string) (tls.Certificate, string) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "acmetest CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames: []string{"localhost"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, _ := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	caFile := filepath.Join(dir, "acme-server-ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, caFile
}

// DNS is an authoritative test DNS server (UDP and TCP on one port).
type DNS struct {
	Addr string
	mu   sync.Mutex
	a    map[string]string   // name → IPv4
	txt  map[string][]string // name → TXT values
	cn   map[string]string   // name → CNAME target
}

// StartDNS serves answers set with SetA/SetTXT/SetCNAME.
func StartDNS(t testing.TB) *DNS {
	d := &DNS{a: map[string]string{}, txt: map[string][]string{}, cn: map[string]string{}}
	pc, ln, err := listenUDPAndTCP()
	if err != nil {
		t.Fatal(err)
	}
	d.Addr = pc.LocalAddr().String()
	h := dns.HandlerFunc(d.serve)
	udp := &dns.Server{PacketConn: pc, Handler: h}
	tcp := &dns.Server{Listener: ln, Handler: h}
	go func() { _ = udp.ActivateAndServe() }()
	go func() { _ = tcp.ActivateAndServe() }()
	t.Cleanup(func() { _ = udp.Shutdown(); _ = tcp.Shutdown() })
	return d
}

// listenUDPAndTCP binds UDP and TCP on one loopback port. The port the
// kernel picks for UDP may be taken for TCP (another test's connection, in
// a parallel package), so it tries a few ports.
func listenUDPAndTCP() (net.PacketConn, net.Listener, error) {
	var err error
	for range 50 {
		var pc net.PacketConn
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			return nil, nil, err
		}
		var ln net.Listener
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			return pc, ln, nil
		}
		pc.Close()
	}
	return nil, nil, err
}

func fqdn(s string) string { return dns.Fqdn(strings.ToLower(s)) }

// SetA answers name with ip.
func (d *DNS) SetA(name, ip string) { d.mu.Lock(); d.a[fqdn(name)] = ip; d.mu.Unlock() }

// SetTXT answers name with the values.
func (d *DNS) SetTXT(name string, v ...string) { d.mu.Lock(); d.txt[fqdn(name)] = v; d.mu.Unlock() }

// SetCNAME answers name with a CNAME to target.
func (d *DNS) SetCNAME(name, target string) {
	d.mu.Lock()
	d.cn[fqdn(name)] = fqdn(target)
	d.mu.Unlock()
}

func (d *DNS) serve(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, q := range r.Question {
		name := strings.ToLower(q.Name)
		hdr := dns.RR_Header{Name: q.Name, Class: dns.ClassINET, Ttl: 5}
		if target, ok := d.cn[name]; ok && q.Qtype != dns.TypeTXT {
			hdr.Rrtype = dns.TypeCNAME
			m.Answer = append(m.Answer, &dns.CNAME{Hdr: hdr, Target: target})
			continue
		}
		switch q.Qtype {
		case dns.TypeA:
			if ip, ok := d.a[name]; ok {
				hdr.Rrtype = dns.TypeA
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: net.ParseIP(ip)})
			}
		case dns.TypeTXT:
			for _, v := range d.txt[name] {
				h := hdr
				h.Rrtype = dns.TypeTXT
				m.Answer = append(m.Answer, &dns.TXT{Hdr: h, Txt: []string{v}})
			}
		case dns.TypeCAA:
		}
	}
	_ = w.WriteMsg(m)
}
