package geodns

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// unbound is Debian's recursive resolver run on loopback with a stub zone
// for the platform zone pointing at the server under test.
type unbound struct {
	addr string
	out  *lockedBuffer
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startUnbound runs unbound on a free loopback port. It sends its queries
// from outgoing (a loopback address) and, with ecs, forwards each
// client's /32 as EDNS Client Subnet. customerRRs are records of the
// customer.test zone.
func startUnbound(t *testing.T, stubAddr, outgoing string, ecs bool, customerRRs ...string) *unbound {
	t.Helper()
	bin, err := exec.LookPath("unbound")
	if err != nil {
		if _, err2 := os.Stat("/usr/sbin/unbound"); err2 != nil {
			t.Fatal("unbound is not installed (Debian package unbound; `make deps` installs it)")
		}
		bin = "/usr/sbin/unbound"
	}
	dir := t.TempDir()
	host, port, _ := net.SplitHostPort(stubAddr)
	var conf strings.Builder
	fmt.Fprintf(&conf, `server:
	interface: 127.0.0.1
	port: %d
	do-ip6: no
	do-daemonize: no
	use-syslog: no
	logfile: ""
	verbosity: 1
	chroot: ""
	username: ""
	directory: %q
	pidfile: %q
	access-control: 127.0.0.0/8 allow
	do-not-query-localhost: no
	outgoing-interface: %s
	qname-minimisation: no
	num-threads: 1
	so-reuseport: no
`, freePort(t), dir, filepath.Join(dir, "unbound.pid"), outgoing)
	if ecs {
		fmt.Fprintf(&conf, "\tmodule-config: \"subnetcache iterator\"\n\tsend-client-subnet: %s\n\tclient-subnet-always-forward: yes\n\tmax-client-subnet-ipv4: 32\n", host)
	} else {
		conf.WriteString("\tmodule-config: \"iterator\"\n")
	}
	// test. is special-use (RFC 6761): unbound answers it NXDOMAIN unless
	// told otherwise.
	conf.WriteString("\tlocal-zone: \"test.\" nodefault\n")
	// The customer's own zone, as its DNS provider would serve it: the
	// resolver follows its CNAMEs like any upstream answer (local-data
	// CNAMEs are not followed).
	zone := "$ORIGIN customer.test.\n@ 300 IN SOA ns.customer.test. hostmaster.customer.test. 1 3600 600 86400 300\n@ 300 IN NS ns.customer.test.\n"
	for _, rr := range customerRRs {
		zone += rr + "\n"
	}
	zonefile := filepath.Join(dir, "customer.test.zone")
	if err := os.WriteFile(zonefile, []byte(zone), 0o644); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&conf, "auth-zone:\n\tname: \"customer.test.\"\n\tzonefile: %q\n\tfor-downstream: no\n\tfor-upstream: yes\n\tfallback-enabled: no\n", zonefile)
	// Every name outside customer.test goes to the server under test, the
	// root included: the resolver never looks past loopback.
	for _, zone := range []string{"zeitwork.test.", "."} {
		fmt.Fprintf(&conf, "stub-zone:\n\tname: %q\n\tstub-addr: %s@%s\n", zone, host, port)
	}
	conf.WriteString("remote-control:\n\tcontrol-enable: no\n")
	path := filepath.Join(dir, "unbound.conf")
	if err := os.WriteFile(path, []byte(conf.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(filepath.Join(filepath.Dir(bin), "unbound-checkconf"), path).CombinedOutput(); err != nil {
		t.Fatalf("unbound-checkconf: %v\n%s\n%s", err, out, conf.String())
	}
	u := &unbound{out: &lockedBuffer{}}
	// The port is in the config; read it back for the address.
	for _, line := range strings.Split(conf.String(), "\n") {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "port: "); ok {
			u.addr = net.JoinHostPort("127.0.0.1", p)
		}
	}
	cmd := exec.Command(bin, "-d", "-c", path)
	cmd.Stdout, cmd.Stderr = u.out, u.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if t.Failed() {
			t.Logf("unbound output:\n%s", u.out.String())
		}
	})
	waitFor(t, 20*time.Second, "unbound answering", func() bool {
		select {
		case <-done:
			t.Fatalf("unbound exited:\n%s", u.out.String())
		default:
		}
		m := q("zeitwork.test.", dns.TypeSOA)
		m.RecursionDesired = true
		r, err := exchange(u.addr, "udp", "", m)
		return err == nil && r.Rcode == dns.RcodeSuccess
	})
	return u
}

func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if pc, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			pc.Close()
			return port
		}
	}
	t.Fatal("no free port for both UDP and TCP")
	return 0
}

// resolve asks the resolver from src over network and requires NOERROR.
func (u *unbound) resolve(t *testing.T, src, network, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m := q(name, qtype)
	m.RecursionDesired = true
	r, err := exchange(u.addr, network, src, m)
	if err != nil {
		t.Fatalf("resolve %s via unbound: %v", name, err)
	}
	if r.Rcode != dns.RcodeSuccess {
		t.Fatalf("resolve %s via unbound: %s\n%v", name, dns.RcodeToString[r.Rcode], r)
	}
	return r
}

// TestRecursiveResolver resolves through a real recursive resolver the way
// customers' users do: a customer domain CNAME'd to the edge name and an
// app under the wildcard reach the client's region; a big answer comes
// through the resolver's TCP retry after TC; a region that fails its
// checks leaves the resolver's answers within detection time plus TTL.
func TestRecursiveResolver(t *testing.T) {
	const ttl = 3
	p := newThreeRegions(t, ttl)
	var big []LoadBalancer
	for i := range 80 {
		big = append(big, lbAt(fmt.Sprintf("2001:db8:99::%x", i+1), p.s2))
	}
	p.cfg.Regions = append(p.cfg.Regions, Region{Name: "big", LoadBalancers: big})
	p.cfg.Geo = append(p.cfg.Geo, GeoName{Name: "big.zeitwork.test", Region: "big"})
	s := startServer(t, p.cfg)
	u := startUnbound(t, s.addr, "127.0.0.1", false,
		"app 300 IN CNAME edge.zeitwork.test.",
		"shop 300 IN CNAME shop-x1y2z3a-acme.zeitwork.test.")
	east := []string{"10.1.0.1", "10.1.0.2"}

	r := u.resolve(t, "", "udp", "app.customer.test.", dns.TypeA)
	if got := addrs(r); !slices.Equal(got, east) || len(r.Answer) != 3 || r.Answer[0].(*dns.CNAME).Target != "edge.zeitwork.test." {
		t.Fatalf("customer CNAME through the resolver: %v", r)
	}
	if got := addrs(u.resolve(t, "", "udp", "shop.customer.test.", dns.TypeA)); !slices.Equal(got, east) {
		t.Fatalf("customer CNAME to an app name: %v", got)
	}
	if got := addrs(u.resolve(t, "", "udp", "web-abc1234-acme.zeitwork.test.", dns.TypeA)); !slices.Equal(got, east) {
		t.Fatalf("wildcard through the resolver: %v", got)
	}
	if got := addrs(u.resolve(t, "", "udp", "db.internal.zeitwork.test.", dns.TypeA)); !slices.Equal(got, []string{"10.9.0.1"}) {
		t.Fatalf("static record through the resolver: %v", got)
	}
	m := q("nope.internal.zeitwork.test.", dns.TypeA)
	m.RecursionDesired = true
	if r, err := exchange(u.addr, "udp", "", m); err != nil || r.Rcode != dns.RcodeNameError {
		t.Fatalf("NXDOMAIN through the resolver: %v %v", r, err)
	}

	// 80 AAAA records do not fit UDP: the resolver gets TC, retries over
	// TCP and hands the whole set to a TCP client.
	if r := u.resolve(t, "", "tcp", "big.zeitwork.test.", dns.TypeAAAA); len(r.Answer) != 80 {
		t.Fatalf("big answer through the resolver: %d records, want 80", len(r.Answer))
	}
	if v := s.metric(t, "zeitwork_dns_truncated_total"); v < 1 {
		t.Fatalf("the resolver never saw TC (truncated = %v)", v)
	}

	// east fails: the resolver's answer moves to west within detection
	// (interval × fall + timeout) plus the TTL it may have cached.
	p.e1.failing.Store(true)
	p.e2.failing.Store(true)
	start := time.Now()
	waitFor(t, 30*time.Second, "resolver answers west", func() bool {
		return slices.Equal(addrs(u.resolve(t, "", "udp", "app.customer.test.", dns.TypeA)), []string{"10.2.0.1"})
	})
	took := time.Since(start)
	t.Logf("resolver failover: %s (TTL %ds)", took.Round(time.Millisecond), ttl)
	if bound := 2*ttl*time.Second + time.Second; took > bound {
		t.Errorf("resolver failover took %s, more than detection + TTL (%s)", took, bound)
	}
}

// TestResolverClientSubnet: a resolver that forwards EDNS Client Subnet
// gets each client's own region, not its own.
func TestResolverClientSubnet(t *testing.T) {
	p := newThreeRegions(t, 30)
	// The resolver sends from 127.0.0.2 (east, as all of 127/8); one
	// client, 127.0.0.3, is mapped to south by its own /32.
	p.cfg.Regions[2].Subnets = append(p.cfg.Regions[2].Subnets, "127.0.0.3/32")
	s := startServer(t, p.cfg)
	u := startUnbound(t, s.addr, "127.0.0.2", true, "app 300 IN CNAME edge.zeitwork.test.")
	if got := addrs(u.resolve(t, "127.0.0.3", "udp", "app.customer.test.", dns.TypeA)); !slices.Equal(got, []string{"10.3.0.1", "10.3.0.2"}) {
		t.Fatalf("client 127.0.0.3 via the resolver: %v, want south", got)
	}
	if got := addrs(u.resolve(t, "127.0.0.4", "udp", "app.customer.test.", dns.TypeA)); !slices.Equal(got, []string{"10.1.0.1", "10.1.0.2"}) {
		t.Fatalf("client 127.0.0.4 via the resolver: %v, want east", got)
	}
	if v := s.metric(t, `zeitwork_dns_geo_answers_total{answer_region="south",client_region="south"}`); v < 1 {
		t.Fatalf("no geo answer counted for south (%v)", v)
	}
}
