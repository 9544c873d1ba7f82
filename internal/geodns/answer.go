package geodns

import (
	"net/netip"
	"strings"

	"github.com/miekg/dns"
)

const (
	// ednsUDPSize is the UDP payload size this server advertises and the
	// most it sends over UDP (the DNS flag day 2020 value: no IP
	// fragmentation on any common path).
	ednsUDPSize = 1232
	// maxChain bounds CNAME chasing inside the served zones.
	maxChain = 8
)

// outcome describes one answered query for the metrics.
type outcome struct {
	clientRegion string // the region the client maps to, or "default"
	geoRegion    string // the region a geo answer came from, or ""
}

// respond answers req from a client at src (the packet's source address;
// an EDNS Client Subnet option overrides it). up reports whether a health
// check target passes; rnd rotates geo answers so clients spread over a
// region's load balancers. It never returns nil and never panics on a
// message that unpacked.
func (d *data) respond(req *dns.Msg, src netip.Addr, up func(key string) bool, rnd uint32) (m *dns.Msg, out outcome) {
	m = new(dns.Msg)
	m.Id = req.Id
	m.Response = true
	m.Opcode = req.Opcode
	m.RecursionDesired = req.RecursionDesired
	m.CheckingDisabled = req.CheckingDisabled
	if len(req.Question) > 0 {
		m.Question = []dns.Question{req.Question[0]}
	}
	out = outcome{clientRegion: "default"}

	var opt *dns.OPT
	opts := 0
	for _, rr := range req.Extra {
		if o, ok := rr.(*dns.OPT); ok {
			opt = o
			opts++
		}
	}
	if opts > 0 {
		ropt := &dns.OPT{Hdr: dns.RR_Header{Name: ".", Rrtype: dns.TypeOPT}}
		ropt.SetUDPSize(ednsUDPSize)
		m.Extra = append(m.Extra, ropt)
		if opts > 1 || opt.Hdr.Name != "." {
			m.Rcode = dns.RcodeFormatError
			return m, out
		}
		if opt.Version() != 0 {
			m.Rcode = dns.RcodeBadVers
			return m, out
		}
	}
	if req.Response {
		m.Rcode = dns.RcodeFormatError
		return m, out
	}
	if req.Opcode != dns.OpcodeQuery {
		m.Rcode = dns.RcodeNotImplemented
		return m, out
	}
	if len(req.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		return m, out
	}

	// The client: its subnet from ECS when the resolver sent one, else
	// the address the query came from.
	order := d.defOrder
	client, useClient := src.Unmap(), src.IsValid()
	var echo *dns.EDNS0_SUBNET
	defer func() { // on the returned answer: only geo answers depend on the client
		if echo != nil && out.geoRegion == "" {
			echo.SourceScope = 0
		}
	}()
	if opt != nil {
		for _, o := range opt.Option {
			ecs, ok := o.(*dns.EDNS0_SUBNET)
			if !ok {
				continue
			}
			a, ok := ecsAddr(ecs)
			if !ok {
				m.Rcode = dns.RcodeFormatError
				return m, out
			}
			// Echo the option; a geo answer holds for the whole source
			// prefix the resolver sent (RFC 7871 §7.2.1), any other for
			// every client (scope 0, set below).
			echo = &dns.EDNS0_SUBNET{
				Code: dns.EDNS0SUBNET, Family: ecs.Family, SourceNetmask: ecs.SourceNetmask,
				SourceScope: ecs.SourceNetmask, Address: ecs.Address,
			}
			m.Extra[0].(*dns.OPT).Option = append(m.Extra[0].(*dns.OPT).Option, echo)
			// SOURCE PREFIX-LENGTH 0: the resolver asks for an answer
			// that does not depend on where its client is.
			client, useClient = a, ecs.SourceNetmask > 0
			break
		}
	}
	if useClient {
		if r := d.clientRegion(client); r != nil {
			order, out.clientRegion = r.order, r.name
		}
	}

	q := req.Question[0]
	if q.Qclass != dns.ClassINET && q.Qclass != dns.ClassANY {
		m.Rcode = dns.RcodeRefused
		return m, out
	}
	name := strings.ToLower(q.Name)
	z := d.zoneOf(name)
	if z == nil {
		m.Rcode = dns.RcodeRefused
		return m, out
	}
	switch q.Qtype {
	case dns.TypeAXFR, dns.TypeIXFR:
		m.Rcode = dns.RcodeRefused // zones are not transferred: every server reads the same file
		return m, out
	case dns.TypeOPT, dns.TypeTSIG, dns.TypeTKEY, dns.TypeMAILA, dns.TypeMAILB:
		m.Rcode = dns.RcodeFormatError
		return m, out
	}
	m.Authoritative = true

	owner := q.Name
	for depth := 0; ; depth++ {
		n := d.find(name)
		if n == nil {
			m.Rcode = dns.RcodeNameError
			m.Ns = []dns.RR{negativeSOA(z)}
			return m, out
		}
		if n.cname != nil && q.Qtype != dns.TypeCNAME && q.Qtype != dns.TypeANY {
			m.Answer = append(m.Answer, withOwner(n.cname, owner))
			target := n.cname.Target
			next := d.zoneOf(target)
			if next == nil || depth+1 >= maxChain {
				return m, out // the resolver follows the chain
			}
			name, owner, z = target, target, next
			continue
		}
		rrs, from := d.records(n, owner, q.Qtype, order, up, rnd)
		if from != "" {
			out.geoRegion = from
		}
		if len(rrs) == 0 {
			m.Ns = []dns.RR{negativeSOA(z)}
		}
		m.Answer = append(m.Answer, rrs...)
		return m, out
	}
}

// ecsAddr validates an EDNS Client Subnet option and returns its address.
func ecsAddr(e *dns.EDNS0_SUBNET) (netip.Addr, bool) {
	if e.SourceScope != 0 {
		return netip.Addr{}, false
	}
	a, ok := netip.AddrFromSlice(e.Address)
	if !ok {
		if e.SourceNetmask == 0 && len(e.Address) == 0 {
			return netip.Addr{}, true
		}
		return netip.Addr{}, false
	}
	switch {
	case e.Family == 1 && a.Unmap().Is4() && e.SourceNetmask <= 32:
		a = a.Unmap()
	case e.Family == 2 && e.SourceNetmask <= 128:
		a = a.Unmap()
		if a.Is4() { // a v4-mapped v6 subnet: keep its v4 bits only
			if e.SourceNetmask < 96 {
				return netip.Addr{}, true
			}
			p, _ := a.Prefix(int(e.SourceNetmask) - 96)
			return p.Addr(), true
		}
	default:
		return netip.Addr{}, false
	}
	p, err := a.Prefix(int(e.SourceNetmask))
	if err != nil {
		return netip.Addr{}, false
	}
	return p.Addr(), true
}

// find returns the node for name: its own, or the wildcard at its
// closest encloser (RFC 4592), or nil when the name does not exist.
func (d *data) find(name string) *node {
	if n := d.nodes[name]; n != nil {
		return n
	}
	ce := name
	for {
		i, end := dns.NextLabel(ce, 0)
		if end || i >= len(ce) {
			return nil
		}
		ce = ce[i:]
		if _, ok := d.nodes[ce]; ok {
			return d.nodes["*."+ce]
		}
	}
}

// records returns n's records of type qtype under owner, and the region a
// geo answer came from.
func (d *data) records(n *node, owner string, qtype uint16, order []*region, up func(string) bool, rnd uint32) ([]dns.RR, string) {
	var out []dns.RR
	from := ""
	apex := n.zone != nil && d.nodes[n.zone.name] == n
	add := func(t uint16) {
		switch {
		case t == dns.TypeSOA && apex:
			out = append(out, withOwner(n.zone.soa, owner))
		case t == dns.TypeNS && apex:
			for _, rr := range n.zone.ns {
				out = append(out, withOwner(rr, owner))
			}
		case (t == dns.TypeA || t == dns.TypeAAAA) && n.geo != nil:
			r, addrs := d.pick(n.geo, order, up)
			from = r.name
			var fam []netip.Addr
			for _, a := range addrs {
				if a.Is4() == (t == dns.TypeA) {
					fam = append(fam, a)
				}
			}
			for i := range fam {
				a := fam[(i+int(rnd%uint32(len(fam))))%len(fam)]
				if t == dns.TypeA {
					out = append(out, &dns.A{Hdr: hdr(owner, t, d.ttl), A: a.AsSlice()})
				} else {
					out = append(out, &dns.AAAA{Hdr: hdr(owner, t, d.ttl), AAAA: a.AsSlice()})
				}
			}
		case t == dns.TypeCNAME && n.cname != nil:
			out = append(out, withOwner(n.cname, owner))
		default:
			for _, rr := range n.rrs[t] {
				out = append(out, withOwner(rr, owner))
			}
		}
	}
	if qtype != dns.TypeANY {
		add(qtype)
		return out, from
	}
	for _, t := range []uint16{dns.TypeSOA, dns.TypeNS, dns.TypeA, dns.TypeAAAA, dns.TypeCNAME, dns.TypeTXT} {
		add(t)
	}
	return out, from
}

// pick returns the first region in order with a healthy load balancer and
// those load balancers. A pinned name uses its region only. When no region
// has one, it fails open: the first region's load balancers are answered
// all, as a dead answer is no worse than none.
func (d *data) pick(g *geoName, order []*region, up func(string) bool) (*region, []netip.Addr) {
	if g.pinned != nil {
		order = []*region{g.pinned}
	}
	for _, r := range order {
		var healthy []netip.Addr
		for _, l := range r.lbs {
			if up(l.key) {
				healthy = append(healthy, l.addr)
			}
		}
		if len(healthy) > 0 {
			return r, healthy
		}
	}
	all := make([]netip.Addr, 0, len(order[0].lbs))
	for _, l := range order[0].lbs {
		all = append(all, l.addr)
	}
	return order[0], all
}

func withOwner(rr dns.RR, owner string) dns.RR {
	c := dns.Copy(rr)
	c.Header().Name = owner
	return c
}

// negativeSOA is the SOA for the authority section of NXDOMAIN and NODATA
// answers: its TTL is the negative caching time (RFC 2308 §3).
func negativeSOA(z *zone) dns.RR {
	soa := dns.Copy(z.soa).(*dns.SOA)
	soa.Hdr.Ttl = min(soa.Hdr.Ttl, soa.Minttl)
	return soa
}
