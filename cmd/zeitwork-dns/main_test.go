package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/zeitwork/zeitwork/internal/servicetest"
)

// TestBinary runs zeitwork-dns as systemd would: bad configuration is
// refused with one message; a good one serves geo answers, fails a region
// over when its load balancer's health endpoint goes away, reloads on
// SIGHUP, keeps the old configuration on a bad reload, and exits 0 on
// SIGTERM.
func TestBinary(t *testing.T) {
	bin := servicetest.Binary(t, "zeitwork-dns")
	servicetest.ExpectBadConfig(t, bin, map[string]string{"DNS_LISTEN": "nope", "DNS_ADMIN_ADDR": ":99999"},
		"DNS_LISTEN", "DNS_ADMIN_ADDR", "DNS_CONFIG")

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "geodns.json")
	if err := os.WriteFile(cfgPath, []byte(`{"ttl": 0, "zones": []}`), 0o644); err != nil {
		t.Fatal(err)
	}
	servicetest.ExpectBadConfig(t, bin, map[string]string{"DNS_CONFIG": cfgPath, "DNS_LISTEN": "127.0.0.1:0"}, "DNS_CONFIG")

	// Two regions' load balancers: their health endpoints.
	east := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer east.Close()
	west := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer west.Close()
	write := func(db string) {
		t.Helper()
		cfg := fmt.Sprintf(`{
  "ttl": 2,
  "zones": [{"name": "zeitwork.test", "ns": ["ns1.zeitwork.test"]}],
  "geo": [{"name": "edge.zeitwork.test"}, {"name": "*.zeitwork.test"}],
  "records": [{"name": "db.internal.zeitwork.test", "type": "A", "value": %q}],
  "regions": [
    {"name": "east", "subnets": ["127.0.0.0/8"], "load_balancers": [{"address": "10.1.0.1", "check": %q}], "fallback": ["west"]},
    {"name": "west", "subnets": ["10.2.0.0/16"], "load_balancers": [{"address": "10.2.0.1", "check": %q}]}
  ],
  "health": {"check": "http", "path": "/health/ready", "interval": "400ms", "timeout": "400ms", "fall": 2, "rise": 1}
}`, db, strings.TrimPrefix(east.URL, "http://"), strings.TrimPrefix(west.URL, "http://"))
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("10.9.0.1")
	dnsAddr, admin := servicetest.FreeAddr(t), servicetest.FreeAddr(t)
	p := servicetest.Start(t, bin, map[string]string{"DNS_LISTEN": dnsAddr, "DNS_ADMIN_ADDR": admin, "DNS_CONFIG": cfgPath}, servicetest.URL(admin)+"/health/ready")
	servicetest.CheckContract(t, bin, p, servicetest.URL(admin), "zeitwork_dns")
	pid := pidOf(t, bin, "DNS_CONFIG="+cfgPath)

	if got := lookup(t, dnsAddr, "udp", "EDGE.zeitwork.test.", dns.TypeA); !slices.Equal(got, []string{"10.1.0.1"}) {
		t.Fatalf("edge from east = %v, want 10.1.0.1", got)
	}
	if got := lookup(t, dnsAddr, "tcp", "web-abc1234-acme.zeitwork.test.", dns.TypeA); !slices.Equal(got, []string{"10.1.0.1"}) {
		t.Fatalf("wildcard over TCP = %v", got)
	}

	// east's load balancer dies: within the TTL the answer is west's.
	east.Close()
	start := time.Now()
	waitFor(t, 15*time.Second, func() bool {
		return slices.Equal(lookup(t, dnsAddr, "udp", "edge.zeitwork.test.", dns.TypeA), []string{"10.2.0.1"})
	})
	t.Logf("failover after %s", time.Since(start).Round(time.Millisecond))
	if code, body := servicetest.Get(t, servicetest.URL(admin)+"/metrics"); code != 200 ||
		!strings.Contains(body, `zeitwork_dns_region_healthy{region="east"} 0`) ||
		!strings.Contains(body, `zeitwork_dns_geo_answers_total{answer_region="west",client_region="east"}`) ||
		!strings.Contains(body, `zeitwork_dns_queries_total{qtype="A",rcode="NOERROR",region="east"}`) {
		t.Fatalf("metrics:\n%s", body)
	}

	// The database moves behind the same name: SIGHUP picks it up.
	write("10.9.0.2")
	if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool {
		return slices.Equal(lookup(t, dnsAddr, "udp", "db.internal.zeitwork.test.", dns.TypeA), []string{"10.9.0.2"})
	})
	// A broken file is rejected; the server keeps answering.
	if err := os.WriteFile(cfgPath, []byte(`{"ttl": 30, "zones": [`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool { return strings.Contains(p.Output(), "config reload rejected") })
	if got := lookup(t, dnsAddr, "udp", "db.internal.zeitwork.test.", dns.TypeA); !slices.Equal(got, []string{"10.9.0.2"}) {
		t.Fatalf("after a bad reload db = %v", got)
	}
	p.StopOK(t, 15*time.Second)
}

func lookup(t *testing.T, addr, network, name string, qtype uint16) []string {
	t.Helper()
	m := new(dns.Msg).SetQuestion(name, qtype)
	c := &dns.Client{Net: network, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		t.Fatalf("query %s over %s: %v", name, network, err)
	}
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

func waitFor(t *testing.T, timeout time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s", timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pidOf finds the process running bin whose environment holds env (this
// test's own config path), to send it SIGHUP as systemctl reload does.
func pidOf(t *testing.T, bin, env string) int {
	t.Helper()
	if abs, err := filepath.Abs(bin); err == nil {
		bin = abs
	}
	if real, err := filepath.EvalSymlinks(bin); err == nil {
		bin = real
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, dir := range procs {
		exe, err := os.Readlink(filepath.Join(dir, "exe"))
		if err != nil || exe != bin {
			continue
		}
		environ, err := os.ReadFile(filepath.Join(dir, "environ"))
		if err != nil || !slices.Contains(strings.Split(string(environ), "\x00"), env) {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(filepath.Base(dir), "%d", &pid); err == nil {
			return pid
		}
	}
	t.Fatalf("no process of %s with %s", bin, env)
	return 0
}
