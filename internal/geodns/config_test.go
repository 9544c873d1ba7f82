package geodns

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

const exampleConfig = "../../deployments/config/geodns.json"

func TestExampleConfig(t *testing.T) {
	c, err := LoadFile(exampleConfig)
	if err != nil {
		t.Fatal(err)
	}
	d, err := compile(c, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if r := d.clientRegion(netip.MustParseAddr("203.0.113.9")); r == nil || r.name != "eu-west" {
		t.Fatalf("203.0.113.9 → %v, want eu-west", r)
	}
	if got := regionNames(d.byName["ap-south"].order); got != "ap-south,eu-west,us-east" {
		t.Fatalf("ap-south order %s", got)
	}
	if len(d.targets) != 9 || d.targets[0].URL != "http://10.1.0.21:8084/health/ready" {
		t.Fatalf("targets %+v", d.targets)
	}
	// Interval × fall + timeout must fit the TTL.
	if detect := time.Duration(d.health.Fall)*time.Duration(d.health.Interval) + time.Duration(d.health.Timeout); detect > time.Duration(d.ttl)*time.Second {
		t.Fatalf("example detects a dead region in %s, more than its TTL %d s", detect, d.ttl)
	}
}

func regionNames(rs []*region) string {
	var n []string
	for _, r := range rs {
		n = append(n, r.name)
	}
	return strings.Join(n, ",")
}

func TestRegionOrder(t *testing.T) {
	c := validConfig()
	c.Regions = append(c.Regions, Region{Name: "c", LoadBalancers: []LoadBalancer{{Address: "10.3.0.1"}}}, Region{Name: "d", LoadBalancers: []LoadBalancer{{Address: "10.4.0.1"}}})
	c.Regions[0].Fallback = []string{"c"}
	c.DefaultOrder = []string{"d", "b"}
	d, err := compile(c, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// Its own fallbacks first, then the rest in the default order (which
	// lists unnamed regions last, in configuration order).
	for name, want := range map[string]string{"a": "a,c,d,b", "b": "b,d,a,c"} {
		if got := regionNames(d.byName[name].order); got != want {
			t.Errorf("order of %s: %s, want %s", name, got, want)
		}
	}
	if got := regionNames(d.defOrder); got != "d,b,a,c" {
		t.Errorf("default order %s", got)
	}
	// The most specific subnet wins.
	c.Regions[1].Subnets = []string{"10.0.0.0/8"}
	c.Regions[2].Subnets = []string{"10.7.0.0/16", "2001:db8::/32"}
	d, err = compile(c, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]string{"10.7.1.1": "c", "10.8.1.1": "b", "::ffff:10.7.0.1": "c", "2001:db8::1": "c", "192.0.2.1": ""} {
		r := d.clientRegion(netip.MustParseAddr(addr))
		if got := ""; r != nil {
			got = r.name
			if got != want {
				t.Errorf("%s → %s, want %s", addr, got, want)
			}
		} else if want != "" {
			t.Errorf("%s → none, want %s", addr, want)
		}
	}
}

// validConfig is a small valid configuration the error table mutates.
func validConfig() *Config {
	return &Config{
		TTL:   30,
		Zones: []Zone{{Name: "zeitwork.test", NS: []string{"ns1.zeitwork.test"}}},
		Geo:   []GeoName{{Name: "edge.zeitwork.test"}, {Name: "*.zeitwork.test"}},
		Records: []Record{
			{Name: "db.internal.zeitwork.test", Type: "A", Value: "10.9.0.1"},
		},
		Regions: []Region{
			{Name: "a", Subnets: []string{"10.1.0.0/16"}, LoadBalancers: []LoadBalancer{{Address: "10.1.0.1"}}, Fallback: []string{"b"}},
			{Name: "b", Subnets: []string{"10.2.0.0/16"}, LoadBalancers: []LoadBalancer{{Address: "10.2.0.1"}}},
		},
		Health: Health{Check: "http"},
	}
}

func TestConfigErrors(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"no ttl", func(c *Config) { c.TTL = 0 }, "ttl: 0 is not within"},
		{"no zones", func(c *Config) { c.Zones = nil }, "zones: at least one zone"},
		{"bad zone", func(c *Config) { c.Zones[0].Name = "bad..name" }, "zones[0].name"},
		{"nested zones", func(c *Config) {
			c.Zones = append(c.Zones, Zone{Name: "internal.zeitwork.test", NS: []string{"ns1.zeitwork.test"}})
		}, "internal.zeitwork.test. is inside zone zeitwork.test."},
		{"zone without NS", func(c *Config) { c.Zones[0].NS = nil }, "needs at least one name server"},
		{"name outside zones", func(c *Config) { c.Geo[0].Name = "edge.example.com" }, "geo[0]: edge.example.com. is outside every zone"},
		{"wildcard inside a label", func(c *Config) { c.Geo[1].Name = "a*.zeitwork.test" }, "geo[1].name"},
		{"wildcard not first", func(c *Config) { c.Geo[1].Name = "a.*.zeitwork.test" }, "geo[1].name"},
		{"geo twice", func(c *Config) { c.Geo = append(c.Geo, GeoName{Name: "EDGE.zeitwork.test."}) }, "geo[2]: edge.zeitwork.test. is already defined by geo[0]"},
		{"no geo", func(c *Config) { c.Geo = nil }, "geo: at least one geo name"},
		{"pinned to nowhere", func(c *Config) { c.Geo[0].Region = "z" }, `geo[0].region: no region "z"`},
		{"A on a geo name", func(c *Config) {
			c.Records = append(c.Records, Record{Name: "edge.zeitwork.test", Type: "A", Value: "10.0.0.1"})
		}, "records[1]: edge.zeitwork.test. is a geo name"},
		{"CNAME beside A", func(c *Config) {
			c.Records = append(c.Records, Record{Name: "db.internal.zeitwork.test", Type: "CNAME", Value: "x.example.com"})
		}, "records[1]: a CNAME at db.internal.zeitwork.test. cannot coexist with records[0]"},
		{"A beside CNAME", func(c *Config) {
			c.Records = []Record{{Name: "w.zeitwork.test", Type: "CNAME", Value: "edge.zeitwork.test"}, {Name: "w.zeitwork.test", Type: "A", Value: "10.0.0.1"}}
		}, "records[1]: w.zeitwork.test. already has a CNAME"},
		{"CNAME at apex", func(c *Config) {
			c.Records = append(c.Records, Record{Name: "zeitwork.test", Type: "CNAME", Value: "x.example.com"})
		}, "cannot be at the zone apex"},
		{"CNAME to itself", func(c *Config) {
			c.Records = append(c.Records, Record{Name: "loop.zeitwork.test", Type: "CNAME", Value: "loop.zeitwork.test"})
		}, "points at itself"},
		{"A with IPv6", func(c *Config) { c.Records[0].Value = "2001:db8::1" }, "is not an IPv4 address (type A)"},
		{"AAAA with IPv4", func(c *Config) { c.Records[0].Type = "AAAA" }, "is not an IPv6 address (type AAAA)"},
		{"unknown type", func(c *Config) { c.Records[0].Type = "MX" }, `type: "MX" is not A, AAAA, CNAME or TXT`},
		{"duplicate record", func(c *Config) { c.Records = append(c.Records, c.Records[0]) }, "duplicate record"},
		{"no regions", func(c *Config) { c.Regions = nil; c.Geo = c.Geo[:1] }, "regions: at least one region"},
		{"bad region name", func(c *Config) { c.Regions[1].Name = "B C" }, `regions[1].name: "B C" is not a region name`},
		{"region twice", func(c *Config) { c.Regions[1].Name = "a" }, "regions[1]: region a is listed twice"},
		{"region without LB", func(c *Config) { c.Regions[1].LoadBalancers = nil }, "regions[1].load_balancers: region b has none"},
		{"bad LB address", func(c *Config) { c.Regions[0].LoadBalancers[0].Address = "lb1.example.com" }, "regions[0].load_balancers[0].address"},
		{"LB twice", func(c *Config) {
			c.Regions[0].LoadBalancers = append(c.Regions[0].LoadBalancers, c.Regions[0].LoadBalancers[0])
		}, "regions[0].load_balancers[1]: 10.1.0.1 is listed twice"},
		{"bad check address", func(c *Config) { c.Regions[0].LoadBalancers[0].Check = "10.1.0.1" }, "regions[0].load_balancers[0].check"},
		{"bad subnet", func(c *Config) { c.Regions[0].Subnets = []string{"10.1.0.0"} }, `regions[0].subnets[0]: "10.1.0.0" is not a CIDR`},
		{"subnet twice", func(c *Config) { c.Regions[1].Subnets = []string{"10.1.0.7/16"} }, "regions[1].subnets[0]: 10.1.0.0/16 is also in region a"},
		{"fallback to nowhere", func(c *Config) { c.Regions[0].Fallback = []string{"z"} }, `regions[0].fallback[0]: no region "z"`},
		{"fallback to itself", func(c *Config) { c.Regions[0].Fallback = []string{"a"} }, "regions[0].fallback[0]: region a is listed twice or is the region itself"},
		{"default order to nowhere", func(c *Config) { c.DefaultOrder = []string{"z"} }, `default_order[0]: no region "z"`},
		{"bad check kind", func(c *Config) { c.Health.Check = "icmp" }, `health.check: "icmp" is not http or tcp`},
		{"bad path", func(c *Config) { c.Health.Path = "health" }, "health.path"},
		{"bad port", func(c *Config) { c.Health.Port = 70000 }, "health.port: 70000 is not a port"},
		{"timeout over interval", func(c *Config) {
			c.Health.Interval, c.Health.Timeout = Duration(time.Second), Duration(2*time.Second)
		}, "health.timeout"},
		{"detection slower than the TTL", func(c *Config) {
			c.TTL, c.Health.Interval, c.Health.Fall = 10, Duration(5*time.Second), 3
		}, "exceeds the ttl (10s)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig()
			tc.mutate(c)
			_, err := compile(c, time.Now())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
			// The same through JSON: Parse reports it too.
			b, _ := json.Marshal(c)
			if _, err := Parse(b); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse: %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := compile(validConfig(), time.Now()); err != nil {
		t.Fatalf("the valid config: %v", err)
	}
}

func TestParseJSON(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{``, "invalid JSON"},
		{`{"ttl": 30, "zonez": []}`, `unknown field "zonez"`},
		{`{"ttl": 30} {}`, "more than one value"},
		{`{"ttl": "30"}`, "invalid JSON"},
		{`{"ttl": -1}`, "invalid JSON"},
		{`{"health": {"interval": "soon"}}`, `duration "soon"`},
		{`{"regions": [{"name": "a", "load_balancers": [{"address": "10.0.0.1", "port": 1}]}]}`, `unknown field "port"`},
	} {
		if _, err := Parse([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %v, want %q", tc.in, err, tc.want)
		}
	}
	// Load balancers as strings or objects; durations as strings or seconds.
	c, err := Parse([]byte(`{"ttl": 30, "zones": [{"name": "z.test", "ns": ["ns.z.test"]}], "geo": [{"name": "edge.z.test"}],
		"regions": [{"name": "a", "load_balancers": ["10.0.0.1", {"address": "10.0.0.2", "check": "127.0.0.1:8084"}]}],
		"health": {"check": "tcp", "interval": 2, "timeout": "500ms"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if lbs := c.Regions[0].LoadBalancers; lbs[0].Address != "10.0.0.1" || lbs[1].Check != "127.0.0.1:8084" || c.Health.Interval != Duration(2*time.Second) {
		t.Fatalf("parsed %+v %+v", lbs, c.Health)
	}

	dir := t.TempDir()
	if _, err := LoadFile(filepath.Join(dir, "missing.json")); err == nil || !strings.Contains(err.Error(), "DNS_CONFIG: cannot read") {
		t.Fatalf("missing file: %v", err)
	}
	big := filepath.Join(dir, "big.json")
	if err := os.WriteFile(big, []byte(strings.Repeat(" ", MaxConfigSize+1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadFile(big); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("big file: %v", err)
	}
}

// FuzzParse: Parse never panics, and a configuration it accepts survives
// a JSON round trip and compiles to servable data.
func FuzzParse(f *testing.F) {
	example, err := os.ReadFile(exampleConfig)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	valid, _ := json.Marshal(validConfig())
	f.Add(valid)
	f.Add([]byte(`{"ttl": 30, "zones": [{"name": "z.test", "ns": ["ns.z.test"]}], "geo": [{"name": "*.z.test"}], "regions": [{"name": "a", "subnets": ["::/0", "0.0.0.0/0"], "load_balancers": ["::1"]}], "health": {"check": "tcp"}}`))
	f.Add([]byte(`{"ttl": 1, "records": [{"name": "\\000.z.test", "type": "TXT", "value": "x"}]}`))
	f.Add([]byte(`{"regions": [{"name": "a", "load_balancers": [1]}]}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse(b)
		if err != nil {
			if c != nil {
				t.Fatal("config returned with an error")
			}
			return
		}
		again, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		c2, err := Parse(again)
		if err != nil {
			t.Fatalf("accepted config fails after a round trip: %v\n%s", err, again)
		}
		d, err := compile(c2, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		// Every geo name answers without panicking.
		for _, g := range c2.Geo {
			name, _ := fqdn(strings.Replace(g.Name, "*", "x", 1), false)
			m, _ := d.respond(new(dns.Msg).SetQuestion(name, dns.TypeA), netip.MustParseAddr("10.1.0.1"), func(string) bool { return false }, 0)
			if _, err := m.Pack(); err != nil {
				t.Fatalf("answer for %s does not pack: %v", name, err)
			}
		}
	})
}

// FuzzRespond feeds arbitrary messages to the query handler: whatever
// unpacks gets an answer that packs, truncates and keeps the question.
func FuzzRespond(f *testing.F) {
	c, err := LoadFile(exampleConfig)
	if err != nil {
		f.Fatal(err)
	}
	d, err := compile(c, time.Now())
	if err != nil {
		f.Fatal(err)
	}
	seed := func(m *dns.Msg) {
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, byte(0))
	}
	seed(new(dns.Msg).SetQuestion("edge.zeitwork.com.", dns.TypeA))
	seed(new(dns.Msg).SetQuestion("WEB-abc1234-acme.zeitwork.app.", dns.TypeAAAA))
	seed(new(dns.Msg).SetQuestion("db.internal.zeitwork.com.", dns.TypeANY))
	seed(new(dns.Msg).SetQuestion("nope.internal.zeitwork.com.", dns.TypeTXT))
	seed(new(dns.Msg).SetQuestion("example.org.", dns.TypeA))
	m := new(dns.Msg).SetQuestion("edge.zeitwork.com.", dns.TypeA)
	m.SetEdns0(1232, true)
	m.IsEdns0().Option = append(m.IsEdns0().Option, &dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: netip.MustParseAddr("203.0.113.0").AsSlice()})
	seed(m)
	m = new(dns.Msg).SetQuestion("edge.zeitwork.com.", dns.TypeA)
	m.SetEdns0(512, false)
	m.IsEdns0().Option = append(m.IsEdns0().Option, &dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 2, SourceNetmask: 120, Address: netip.MustParseAddr("::ffff:10.3.0.0").AsSlice()})
	seed(m)
	f.Fuzz(func(t *testing.T, b []byte, health byte) {
		req := new(dns.Msg)
		if err := req.Unpack(b); err != nil {
			return
		}
		up := func(key string) bool { return (len(key)+int(health))%3 != 0 }
		resp, out := d.respond(req, netip.MustParseAddr("10.2.0.9"), up, uint32(health))
		if resp == nil || out.clientRegion == "" {
			t.Fatal("no answer")
		}
		if resp.Id != req.Id || !resp.Response {
			t.Fatalf("answer header %v for %v", resp.MsgHdr, req.MsgHdr)
		}
		if len(req.Question) > 0 && (len(resp.Question) != 1 || resp.Question[0] != req.Question[0]) {
			t.Fatalf("question %v, asked %v", resp.Question, req.Question)
		}
		full, err := resp.Pack()
		if err != nil {
			t.Fatalf("answer does not pack: %v\n%v", err, resp)
		}
		resp.Truncate(dns.MinMsgSize)
		small, err := resp.Pack()
		if err != nil || len(small) > max(dns.MinMsgSize, len(full)) {
			t.Fatalf("truncated answer: %d bytes, %v", len(small), err)
		}
	})
}
