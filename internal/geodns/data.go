package geodns

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// data is a compiled configuration: immutable, swapped whole on reload.
type data struct {
	ttl, negTTL uint32
	zones       []*zone          // longest name first
	nodes       map[string]*node // lower-case FQDN → node; empty non-terminals included
	regions     []*region        // configuration order
	byName      map[string]*region
	subnets     map[int]map[netip.Prefix]*region // by prefix length (+1000 for IPv4)
	subnetBits  []int                            // the lengths present, longest first
	defOrder    []*region
	health      Health
	targets     []Target // every load balancer's health check, deduplicated
}

type zone struct {
	name string
	soa  *dns.SOA
	ns   []dns.RR
}

// node is one owner name. rrs holds static records by type with their
// configured owner; answers copy them under the query's spelling.
type node struct {
	zone  *zone
	rrs   map[uint16][]dns.RR
	cname *dns.CNAME
	geo   *geoName
}

type geoName struct{ pinned *region }

type region struct {
	name  string
	lbs   []lb
	order []*region // this region, its fallbacks, then the rest of the default order
}

type lb struct {
	addr netip.Addr
	key  string // Target.Key of its health check
}

// maxRRset bounds the records of one name and type (and a region's load
// balancers): 1000 AAAA records are 28 KB, well inside a TCP answer.
const maxRRset = 1000

var regionName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// compile validates c and builds its lookup structures. now sets the SOA
// serial of zones without one.
func compile(c *Config, now time.Time) (*data, error) {
	var p problems
	d := &data{nodes: map[string]*node{}, byName: map[string]*region{}, subnets: map[int]map[netip.Prefix]*region{}}

	d.ttl, d.negTTL = c.TTL, c.NegativeTTL
	if d.ttl < 1 || d.ttl > 86400 {
		p.add("ttl: %d is not within [1, 86400] seconds", c.TTL)
	}
	if d.negTTL == 0 {
		d.negTTL = d.ttl
	} else if d.negTTL > 86400 {
		p.add("negative_ttl: %d is not within [1, 86400] seconds", c.NegativeTTL)
	}

	// Health checks.
	h := c.Health
	switch h.Check {
	case "http":
		if h.Path == "" {
			h.Path = "/health/ready"
		}
		if !strings.HasPrefix(h.Path, "/") || strings.ContainsAny(h.Path, " \r\n#") {
			p.add("health.path: %q is not an absolute URL path", h.Path)
		}
		if h.Port == 0 {
			h.Port = 8084
		}
	case "tcp":
		if h.Port == 0 {
			h.Port = 443
		}
	default:
		p.add("health.check: %q is not http or tcp", h.Check)
	}
	if h.Port < 1 || h.Port > 65535 {
		p.add("health.port: %d is not a port", h.Port)
	}
	if h.Interval == 0 {
		h.Interval = Duration(2 * time.Second)
	}
	if h.Timeout == 0 {
		h.Timeout = Duration(time.Second)
	}
	if h.Fall == 0 {
		h.Fall = 3
	}
	if h.Rise == 0 {
		h.Rise = 2
	}
	iv, to := time.Duration(h.Interval), time.Duration(h.Timeout)
	if iv < 100*time.Millisecond || iv > time.Hour {
		p.add("health.interval: %s is not within [100ms, 1h]", iv)
	}
	if to < 10*time.Millisecond || to > iv {
		p.add("health.timeout: %s is not within [10ms, interval %s]", to, iv)
	}
	if h.Fall < 1 || h.Fall > 100 {
		p.add("health.fall: %d is not within [1, 100]", h.Fall)
	}
	if h.Rise < 1 || h.Rise > 100 {
		p.add("health.rise: %d is not within [1, 100]", h.Rise)
	}
	// A dead region must leave the answers within one TTL.
	if detect := time.Duration(h.Fall)*iv + to; d.ttl >= 1 && h.Fall >= 1 && detect > time.Duration(d.ttl)*time.Second {
		p.add("health: interval × fall + timeout (%s) exceeds the ttl (%ds); a dead region would be answered longer than a TTL", detect, d.ttl)
	}
	d.health = h

	// Zones.
	for i, zc := range c.Zones {
		name, err := fqdn(zc.Name, false)
		if err != nil {
			p.add("zones[%d].name: %v", i, err)
			continue
		}
		if _, dup := d.nodes[name]; dup {
			p.add("zones[%d]: zone %s is listed twice", i, name)
			continue
		}
		z := &zone{name: name}
		serial := zc.Serial
		if serial == 0 {
			serial = uint32(now.Unix())
		}
		mbox := "hostmaster." + name
		if zc.Hostmaster != "" {
			if mbox, err = fqdn(zc.Hostmaster, false); err != nil {
				p.add("zones[%d].hostmaster: %v", i, err)
			}
		}
		if len(zc.NS) == 0 {
			p.add("zones[%d].ns: zone %s needs at least one name server", i, name)
		}
		for j, ns := range zc.NS {
			n, err := fqdn(ns, false)
			if err != nil {
				p.add("zones[%d].ns[%d]: %v", i, j, err)
				continue
			}
			z.ns = append(z.ns, &dns.NS{Hdr: hdr(name, dns.TypeNS, d.ttl), Ns: n})
		}
		primary := "ns." + name
		if len(z.ns) > 0 {
			primary = z.ns[0].(*dns.NS).Ns
		}
		z.soa = &dns.SOA{Hdr: hdr(name, dns.TypeSOA, d.ttl), Ns: primary, Mbox: mbox, Serial: serial,
			Refresh: 3600, Retry: 600, Expire: 604800, Minttl: d.negTTL}
		d.zones = append(d.zones, z)
		d.nodes[name] = &node{zone: z, rrs: map[uint16][]dns.RR{}}
	}
	if len(c.Zones) == 0 {
		p.add("zones: at least one zone is required")
	}
	for _, z := range d.zones {
		for parent := z.name; ; {
			i, end := dns.NextLabel(parent, 0)
			if end {
				break
			}
			if parent = parent[i:]; d.nodes[parent] != nil {
				p.add("zones: %s is inside zone %s; serve its names in %s", z.name, parent, parent)
				break
			}
		}
	}
	slices.SortFunc(d.zones, func(a, b *zone) int { return cmp.Compare(len(b.name), len(a.name)) })

	// Regions.
	seenTarget := map[string]bool{}
	for i, rc := range c.Regions {
		if !regionName.MatchString(rc.Name) {
			p.add("regions[%d].name: %q is not a region name ([a-z0-9_-], at most 63)", i, rc.Name)
			continue
		}
		if d.byName[rc.Name] != nil {
			p.add("regions[%d]: region %s is listed twice", i, rc.Name)
			continue
		}
		r := &region{name: rc.Name}
		d.byName[r.name], d.regions = r, append(d.regions, r)
		if len(rc.LoadBalancers) == 0 {
			p.add("regions[%d].load_balancers: region %s has none", i, r.name)
		}
		if len(rc.LoadBalancers) > maxRRset {
			p.add("regions[%d].load_balancers: region %s has more than %d", i, r.name, maxRRset)
			continue
		}
		seenAddr := map[netip.Addr]bool{}
		for j, l := range rc.LoadBalancers {
			a, err := parseAddr(l.Address)
			if err != nil {
				p.add("regions[%d].load_balancers[%d].address: %v", i, j, err)
				continue
			}
			if seenAddr[a] {
				p.add("regions[%d].load_balancers[%d]: %s is listed twice", i, j, a)
				continue
			}
			seenAddr[a] = true
			hostport := net.JoinHostPort(a.String(), strconv.Itoa(h.Port))
			if l.Check != "" {
				if err := checkHostPort(l.Check); err != nil {
					p.add("regions[%d].load_balancers[%d].check: %v", i, j, err)
					continue
				}
				hostport = l.Check
			}
			t := Target{Kind: h.Check, Addr: hostport}
			if h.Check == "http" {
				t.URL = "http://" + hostport + h.Path
				t.Key = t.URL
			} else {
				t.Key = "tcp://" + hostport
			}
			r.lbs = append(r.lbs, lb{addr: a, key: t.Key})
			if !seenTarget[t.Key] {
				seenTarget[t.Key] = true
				d.targets = append(d.targets, t)
			}
		}
	}
	if len(c.Regions) == 0 {
		p.add("regions: at least one region is required")
	}
	seenSubnet := map[netip.Prefix]*region{}
	for i, rc := range c.Regions {
		for j, s := range rc.Subnets {
			pf, err := netip.ParsePrefix(strings.TrimSpace(s))
			if err != nil {
				p.add("regions[%d].subnets[%d]: %q is not a CIDR", i, j, s)
				continue
			}
			if pf.Addr().Is4In6() || pf.Addr().Zone() != "" {
				p.add("regions[%d].subnets[%d]: %q: write IPv4 subnets as a.b.c.d/n, without a zone", i, j, s)
				continue
			}
			pf = pf.Masked()
			if other := seenSubnet[pf]; other != nil {
				p.add("regions[%d].subnets[%d]: %s is also in region %s", i, j, pf, other.name)
				continue
			}
			if r := d.byName[rc.Name]; r != nil {
				seenSubnet[pf] = r
			}
		}
	}
	for pf, r := range seenSubnet {
		bits := pf.Bits()
		if pf.Addr().Is4() {
			bits += 1000 // IPv4 and IPv6 lengths apart
		}
		if d.subnets[bits] == nil {
			d.subnets[bits] = map[netip.Prefix]*region{}
			d.subnetBits = append(d.subnetBits, pf.Bits())
		}
		d.subnets[bits][pf] = r
	}
	slices.Sort(d.subnetBits)
	d.subnetBits = slices.Compact(d.subnetBits)
	slices.Reverse(d.subnetBits)

	// Region orders.
	seen := map[*region]bool{}
	for i, name := range c.DefaultOrder {
		r := d.byName[name]
		switch {
		case r == nil:
			p.add("default_order[%d]: no region %q", i, name)
		case seen[r]:
			p.add("default_order[%d]: region %s is listed twice", i, name)
		default:
			seen[r] = true
			d.defOrder = append(d.defOrder, r)
		}
	}
	for _, r := range d.regions {
		if !seen[r] {
			d.defOrder = append(d.defOrder, r)
		}
	}
	for i, rc := range c.Regions {
		r := d.byName[rc.Name]
		if r == nil || len(r.order) > 0 {
			continue
		}
		in := map[*region]bool{r: true}
		r.order = []*region{r}
		for j, name := range rc.Fallback {
			f := d.byName[name]
			switch {
			case f == nil:
				p.add("regions[%d].fallback[%d]: no region %q", i, j, name)
			case in[f]:
				p.add("regions[%d].fallback[%d]: region %s is listed twice or is the region itself", i, j, name)
			default:
				in[f] = true
				r.order = append(r.order, f)
			}
		}
		for _, f := range d.defOrder {
			if !in[f] {
				r.order = append(r.order, f)
			}
		}
	}

	// Names.
	owner := map[string]string{} // name → what defined it, for messages
	addNode := func(name, what string) *node {
		z := d.zoneOf(name)
		if z == nil {
			p.add("%s: %s is outside every zone", what, name)
			return nil
		}
		n := d.nodes[name]
		if n == nil {
			n = &node{zone: z, rrs: map[uint16][]dns.RR{}}
			d.nodes[name] = n
		}
		return n
	}
	for i, g := range c.Geo {
		what := fmt.Sprintf("geo[%d]", i)
		name, err := fqdn(g.Name, true)
		if err != nil {
			p.add("%s.name: %v", what, err)
			continue
		}
		if prev, dup := owner[name]; dup {
			p.add("%s: %s is already defined by %s", what, name, prev)
			continue
		}
		gn := &geoName{}
		if g.Region != "" {
			if gn.pinned = d.byName[g.Region]; gn.pinned == nil {
				p.add("%s.region: no region %q", what, g.Region)
			}
		}
		if n := addNode(name, what); n != nil {
			owner[name] = what
			n.geo = gn
		}
	}
	if len(c.Geo) == 0 {
		p.add("geo: at least one geo name (e.g. edge.<zone>) is required")
	}
	for i, rc := range c.Records {
		what := fmt.Sprintf("records[%d]", i)
		name, err := fqdn(rc.Name, true)
		if err != nil {
			p.add("%s.name: %v", what, err)
			continue
		}
		ttl := rc.TTL
		if ttl == 0 {
			ttl = d.ttl
		} else if ttl > 86400 {
			p.add("%s.ttl: %d is not within [1, 86400] seconds", what, ttl)
		}
		rr, err := staticRR(name, strings.ToUpper(strings.TrimSpace(rc.Type)), rc.Value, ttl)
		if err != nil {
			p.add("%s: %v", what, err)
			continue
		}
		n := addNode(name, what)
		if n == nil {
			continue
		}
		t := rr.Header().Rrtype
		prev, defined := owner[name]
		switch {
		case t == dns.TypeCNAME && d.zoneOf(name) != nil && d.zoneOf(name).name == name:
			p.add("%s: a CNAME cannot be at the zone apex %s", what, name)
		case t == dns.TypeCNAME && defined:
			p.add("%s: a CNAME at %s cannot coexist with %s", what, name, prev)
		case n.cname != nil:
			p.add("%s: %s already has a CNAME (%s)", what, name, owner[name])
		case n.geo != nil && t != dns.TypeTXT:
			p.add("%s: %s is a geo name (%s); only TXT records can be added to it", what, name, prev)
		case t == dns.TypeCNAME:
			n.cname = rr.(*dns.CNAME)
		default:
			if len(n.rrs[t]) >= maxRRset {
				p.add("%s: %s has more than %d %s records", what, name, maxRRset, dns.TypeToString[t])
				continue
			}
			if slices.ContainsFunc(n.rrs[t], func(o dns.RR) bool { return dns.IsDuplicate(o, rr) }) {
				p.add("%s: duplicate record %s", what, rr)
				continue
			}
			n.rrs[t] = append(n.rrs[t], rr)
		}
		if !defined {
			owner[name] = what
		}
	}
	// Empty non-terminals exist: they answer NODATA, not NXDOMAIN, and stop
	// a wildcard above them from matching below them (RFC 4592).
	for name, n := range d.nodes {
		for parent := name; parent != n.zone.name; {
			i, _ := dns.NextLabel(parent, 0)
			parent = parent[i:]
			if _, ok := d.nodes[parent]; ok {
				break
			}
			d.nodes[parent] = &node{zone: n.zone, rrs: map[uint16][]dns.RR{}}
		}
	}
	if err := p.err(); err != nil {
		return nil, err
	}
	return d, nil
}

func hdr(name string, t uint16, ttl uint32) dns.RR_Header {
	return dns.RR_Header{Name: name, Rrtype: t, Class: dns.ClassINET, Ttl: ttl}
}

func staticRR(name, typ, value string, ttl uint32) (dns.RR, error) {
	switch typ {
	case "A", "AAAA":
		a, err := parseAddr(value)
		if err != nil {
			return nil, fmt.Errorf("value: %v", err)
		}
		if typ == "A" {
			if !a.Is4() {
				return nil, fmt.Errorf("value: %s is not an IPv4 address (type A)", a)
			}
			return &dns.A{Hdr: hdr(name, dns.TypeA, ttl), A: a.AsSlice()}, nil
		}
		if !a.Is6() {
			return nil, fmt.Errorf("value: %s is not an IPv6 address (type AAAA)", a)
		}
		return &dns.AAAA{Hdr: hdr(name, dns.TypeAAAA, ttl), AAAA: a.AsSlice()}, nil
	case "CNAME":
		target, err := fqdn(value, false)
		if err != nil {
			return nil, fmt.Errorf("value: %v", err)
		}
		if target == name {
			return nil, fmt.Errorf("value: CNAME %s points at itself", name)
		}
		return &dns.CNAME{Hdr: hdr(name, dns.TypeCNAME, ttl), Target: target}, nil
	case "TXT":
		if len(value) > 4000 {
			return nil, fmt.Errorf("value: TXT of %d bytes is longer than 4000", len(value))
		}
		var chunks []string
		for len(value) > 255 {
			chunks, value = append(chunks, value[:255]), value[255:]
		}
		chunks = append(chunks, value)
		return &dns.TXT{Hdr: hdr(name, dns.TypeTXT, ttl), Txt: chunks}, nil
	default:
		return nil, fmt.Errorf("type: %q is not A, AAAA, CNAME or TXT", typ)
	}
}

// zoneOf returns the zone name belongs to, or nil.
func (d *data) zoneOf(name string) *zone {
	for _, z := range d.zones {
		if dns.IsSubDomain(z.name, name) {
			return z
		}
	}
	return nil
}

// clientRegion returns the region whose most specific subnet holds a, or
// nil.
func (d *data) clientRegion(a netip.Addr) *region {
	a = a.Unmap()
	off := 0
	if a.Is4() {
		off = 1000
	}
	for _, bits := range d.subnetBits {
		m := d.subnets[bits+off]
		if m == nil {
			continue
		}
		if p, err := a.Prefix(bits); err == nil {
			if r := m[p]; r != nil {
				return r
			}
		}
	}
	return nil
}
