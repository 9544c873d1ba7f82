package topology

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/geodns"
)

func TestLayout(t *testing.T) {
	l, err := NewLayout([]string{"us-east", "eu-west", "ap-south"}, []time.Duration{10 * time.Millisecond, 15 * time.Millisecond, 30 * time.Millisecond}, 3, 6)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(l.All(RoleOperator)); n != 9 {
		t.Fatalf("%d operators", n)
	}
	if n := len(l.All(RoleWorker)); n != 18 {
		t.Fatalf("%d workers", n)
	}
	ips, names, subnets := map[string]bool{}, map[string]bool{}, map[string]bool{}
	vmRange := netip.MustParsePrefix("10.250.128.0/17")
	for _, r := range l.Regions {
		sub := netip.MustParsePrefix(r.Subnet)
		for _, h := range r.Hosts {
			if ips[h.IP] || names[h.Name] {
				t.Fatalf("duplicate host %s %s", h.Name, h.IP)
			}
			ips[h.IP], names[h.Name] = true, true
			if !sub.Contains(netip.MustParseAddr(h.IP)) {
				t.Errorf("%s (%s) outside its region's %s", h.Name, h.IP, r.Subnet)
			}
			if !strings.HasPrefix(h.Name, Prefix) || len("v"+strings.TrimPrefix(h.Name, Prefix)) > 15 {
				t.Errorf("namespace %s: prefix or interface name length", h.Name)
			}
			if h.Role == RoleWorker {
				p := netip.MustParsePrefix(h.VMSubnet)
				if subnets[h.VMSubnet] || !vmRange.Contains(p.Addr()) {
					t.Errorf("VM subnet %s of %s duplicate or outside %s", h.VMSubnet, h.Name, vmRange)
				}
				subnets[h.VMSubnet] = true
			}
		}
	}
	if got := l.byDistance(2); got[0] != 0 || got[1] != 1 {
		t.Errorf("regions by distance from ap-south: %v", got)
	}
	if u := l.OperatorURLs(1); !strings.HasPrefix(u, "http://10.250.2.11:8080,") || strings.Count(u, ",") != 8 {
		t.Errorf("OPERATOR_URL of eu-west: %s", u)
	}
}

func TestLayoutRejects(t *testing.T) {
	for _, c := range []struct {
		regions    []string
		ops, works int
	}{
		{nil, 3, 6}, {[]string{"a"}, 0, 6}, {[]string{"a"}, 3, 9}, {[]string{"a b"}, 3, 6},
		{[]string{"1", "2", "3", "4", "5", "6", "7", "8", "9"}, 1, 1},
	} {
		if _, err := NewLayout(c.regions, nil, c.ops, c.works); err == nil {
			t.Errorf("NewLayout(%v, %d, %d) accepted", c.regions, c.ops, c.works)
		}
	}
}

// TestFirewall checks each role's rules: who may reach which port.
func TestFirewall(t *testing.T) {
	l, err := NewLayout([]string{"a", "b"}, nil, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	op := l.Regions[0].Of(RoleOperator)[0]
	w := l.Regions[1].Of(RoleWorker)[0]
	fw := l.Firewall(op)
	for _, want := range []string{"policy drop", "ip saddr { 10.250.1.21, 10.250.1.22, 10.250.2.21, 10.250.2.22 } tcp dport 8080 accept", "ct state established,related accept"} {
		if !strings.Contains(fw, want) {
			t.Errorf("operator firewall lacks %q:\n%s", want, fw)
		}
	}
	if strings.Contains(fw, "8081") || strings.Contains(fw, "5432") {
		t.Errorf("operator firewall opens a port it does not serve:\n%s", fw)
	}
	fw = l.Firewall(w)
	for _, want := range []string{
		"ip saddr { 10.250.1.11, 10.250.1.12, 10.250.1.21, 10.250.1.22, 10.250.2.11, 10.250.2.12, 10.250.2.21, 10.250.2.22 } tcp dport 8081 accept",
		"ip saddr { 10.250.2.21, 10.250.2.22 } tcp dport { 443, 8083 } accept",
		"tcp dport { 8082, 8085 } accept",
		"ip saddr { 10.250.1.53, 10.250.2.53 } tcp dport 8084 accept",
	} {
		if !strings.Contains(fw, want) {
			t.Errorf("worker firewall lacks %q:\n%s", want, fw)
		}
	}
	if fw := l.Firewall(l.DB); !strings.Contains(fw, "ip saddr { 10.250.1.11, 10.250.1.12, 10.250.2.11, 10.250.2.12 } tcp dport 5432 accept") {
		t.Errorf("database firewall:\n%s", fw)
	}
	if fw := l.Firewall(l.Regions[0].Of(RoleClient)[0]); strings.Contains(fw, "dport") {
		t.Errorf("a client accepts connections:\n%s", fw)
	}
}

func TestDNSConfig(t *testing.T) {
	l, err := NewLayout([]string{"us-east", "eu-west"}, []time.Duration{20 * time.Millisecond, 10 * time.Millisecond}, 1, 2)
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.DNSConfig("zeitwork.test", "apps.zeitwork.test", "10.250.0.10", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var c dnsConfig
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	if c.TTL != 5 || len(c.Regions) != 2 || c.Regions[0].Subnets[0] != "10.250.1.0/24" || len(c.Regions[1].LoadBalancers) != 2 ||
		c.Regions[0].Fallback[0] != "eu-west" || c.Geo[1].Name != "*.apps.zeitwork.test" || c.Records[0].Value != "10.250.0.10" {
		t.Fatalf("config: %s", b)
	}
	// The GeoDNS server accepts it.
	path := filepath.Join(t.TempDir(), "geodns.json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := geodns.LoadFile(path); err != nil {
		t.Fatalf("zeitwork-dns rejects the configuration: %v\n%s", err, b)
	}
}
