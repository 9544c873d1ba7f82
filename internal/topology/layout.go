package topology

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// Role is what a host of the layout runs.
type Role string

// The hosts of a region, and the shared ones.
const (
	RoleOperator Role = "operator" // zeitwork-operator :8080
	RoleWorker   Role = "worker"   // node agent (+ data plane) :8081, edge :443/:8083, LB :8082/:8085, admin :8084
	RoleDNS      Role = "dns"      // the region's GeoDNS server :53
	RoleClient   Role = "client"   // a user of the region: no service
	RoleDB       Role = "db"       // PostgreSQL :5432
)

// Host is one network namespace of the layout.
type Host struct {
	Name   string // namespace name, e.g. zwt-a-w1
	Role   Role
	Region int // index into Layout.Regions; -1 for shared hosts
	Index  int // 1-based within its role and region
	IP     string
	// VMSubnet is a worker's VM_SUBNET (10.250.128.0/17 is split in /24s).
	VMSubnet string
}

// Region is one region of the layout.
type Region struct {
	Name   string
	Key    string        // one letter, part of its namespace names
	Subnet string        // 10.250.<1+i>.0/24, the region's LAN
	Router string        // namespace name of the region's router
	Delay  time.Duration // one-way delay of its link to the core
	Hosts  []*Host
}

// Layout is the pure description of the topology: names, addresses,
// links and firewall rules. Building it touches nothing on the machine.
type Layout struct {
	Regions []*Region
	Core    string // namespace of the core router
	DB      *Host  // the PostgreSQL host
	DB2     *Host  // where PostgreSQL moves to in a failover
	// Mgmt is the host side (root namespace) of the management link: the
	// registry listens there, and it may reach every host's service ports
	// (the management network of the deployment guide).
	Mgmt     string
	MgmtPeer string // the core's end of the management link
}

// Prefix starts the name of every namespace, interface and nftables table
// the topology creates; stale ones from a crashed run are found by it.
const Prefix = "zwt-"

// Addressing (all inside 10.250.0.0/16):
//
//	10.250.0.0/24          shared services LAN on the core (PostgreSQL .10, .11)
//	10.250.<1+r>.0/24      region r's LAN (router .1, operators .11…, workers .21…, DNS .53, client .100)
//	10.250.100.<4r>/30     core ↔ region r router link
//	10.250.254.0/30        management link: root namespace .1 ↔ core .2
//	10.250.<128+8r+w>.0/24 VM subnet of worker w (0-based) of region r
const (
	mgmtIP     = "10.250.254.1"
	mgmtPeerIP = "10.250.254.2"
	mgmtNet    = "10.250.254.0/30"
	svcRouter  = "10.250.0.1"
)

// NewLayout describes regions (each with its one-way core link delay) of
// operators and workers each.
func NewLayout(regions []string, delays []time.Duration, operators, workers int) (*Layout, error) {
	if len(regions) == 0 || len(regions) > 8 {
		return nil, fmt.Errorf("topology: %d regions (1 to 8 supported)", len(regions))
	}
	if operators < 1 || operators > 9 || workers < 1 || workers > 8 {
		return nil, fmt.Errorf("topology: %d operators and %d workers per region (1–9 and 1–8 supported)", operators, workers)
	}
	l := &Layout{Core: Prefix + "core", Mgmt: mgmtIP, MgmtPeer: mgmtPeerIP,
		DB:  &Host{Name: Prefix + "db", Role: RoleDB, Region: -1, Index: 1, IP: "10.250.0.10"},
		DB2: &Host{Name: Prefix + "db2", Role: RoleDB, Region: -1, Index: 2, IP: "10.250.0.11"},
	}
	for i, name := range regions {
		if name == "" || strings.ContainsAny(name, " \t,") {
			return nil, fmt.Errorf("topology: invalid region name %q", name)
		}
		key := string(rune('a' + i))
		r := &Region{Name: name, Key: key, Subnet: fmt.Sprintf("10.250.%d.0/24", 1+i), Router: Prefix + key + "-rt"}
		if i < len(delays) {
			r.Delay = delays[i]
		}
		ip := func(host int) string { return fmt.Sprintf("10.250.%d.%d", 1+i, host) }
		for n := 1; n <= operators; n++ {
			r.Hosts = append(r.Hosts, &Host{Name: fmt.Sprintf("%s%s-op%d", Prefix, key, n), Role: RoleOperator, Region: i, Index: n, IP: ip(10 + n)})
		}
		for n := 1; n <= workers; n++ {
			r.Hosts = append(r.Hosts, &Host{Name: fmt.Sprintf("%s%s-w%d", Prefix, key, n), Role: RoleWorker, Region: i, Index: n, IP: ip(20 + n),
				VMSubnet: fmt.Sprintf("10.250.%d.0/24", 128+8*i+n-1)})
		}
		r.Hosts = append(r.Hosts,
			&Host{Name: Prefix + key + "-dns", Role: RoleDNS, Region: i, Index: 1, IP: ip(53)},
			&Host{Name: Prefix + key + "-cl", Role: RoleClient, Region: i, Index: 1, IP: ip(100)})
		l.Regions = append(l.Regions, r)
	}
	return l, nil
}

// Hosts returns the region's hosts of one role.
func (r *Region) Of(role Role) []*Host {
	var out []*Host
	for _, h := range r.Hosts {
		if h.Role == role {
			out = append(out, h)
		}
	}
	return out
}

// All returns every host of one role across regions, region by region.
func (l *Layout) All(role Role) []*Host {
	var out []*Host
	for _, r := range l.Regions {
		out = append(out, r.Of(role)...)
	}
	return out
}

// Namespaces lists every namespace of the layout (routers first).
func (l *Layout) Namespaces() []string {
	ns := []string{l.Core, l.DB.Name}
	for _, r := range l.Regions {
		ns = append(ns, r.Router)
		for _, h := range r.Hosts {
			ns = append(ns, h.Name)
		}
	}
	return ns
}

// coreLink returns the /30 addresses of region i's link: core side, router side.
func coreLink(i int) (core, router string) {
	return fmt.Sprintf("10.250.100.%d", 4*i+1), fmt.Sprintf("10.250.100.%d", 4*i+2)
}

// OperatorURLs lists the operators for a host of region ri: its own
// region's first, then the others', as OPERATOR_URL.
func (l *Layout) OperatorURLs(ri int) string {
	var urls []string
	order := []int{ri}
	for i := range l.Regions {
		if i != ri {
			order = append(order, i)
		}
	}
	for _, i := range order {
		for _, h := range l.Regions[i].Of(RoleOperator) {
			urls = append(urls, "http://"+h.IP+":8080")
		}
	}
	return strings.Join(urls, ",")
}

func ips(hosts []*Host) string {
	var s []string
	for _, h := range hosts {
		s = append(s, h.IP)
	}
	slices.Sort(s)
	return strings.Join(s, ", ")
}

// Firewall returns the nftables ruleset of a host: the deployment guide's
// firewall section, tightened to what each port's callers are.
//
//   - operator :8080 from workers (node agents, edges, load balancers) only;
//   - worker :8081 (node agent data plane and API) from operators and
//     edges (workers) only; :443/:8083 (edge) from the region's load
//     balancers only; :8082/:8085 (load balancer) from anyone; :8084 (LB
//     admin, the GeoDNS health check) from the DNS servers only;
//   - PostgreSQL :5432 from operators only;
//   - DNS :53 from anyone;
//   - the management network (the root namespace) reaches every port;
//   - everything else is dropped.
func (l *Layout) Firewall(h *Host) string {
	var accept []string
	switch h.Role {
	case RoleOperator:
		accept = append(accept, fmt.Sprintf("ip saddr { %s } tcp dport 8080 accept", ips(l.All(RoleWorker))))
	case RoleWorker:
		callers := append(l.All(RoleOperator), l.All(RoleWorker)...)
		accept = append(accept,
			fmt.Sprintf("ip saddr { %s } tcp dport 8081 accept", ips(callers)),
			fmt.Sprintf("ip saddr { %s } tcp dport { 443, 8083 } accept", ips(l.Regions[h.Region].Of(RoleWorker))),
			"tcp dport { 8082, 8085 } accept",
			fmt.Sprintf("ip saddr { %s } tcp dport 8084 accept", ips(l.All(RoleDNS))))
	case RoleDB:
		accept = append(accept, fmt.Sprintf("ip saddr { %s } tcp dport 5432 accept", ips(l.All(RoleOperator))))
	case RoleDNS:
		accept = append(accept, "udp dport 53 accept", "tcp dport 53 accept")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %sfw {\n\tchain input {\n\t\ttype filter hook input priority 0; policy drop;\n", strings.TrimSuffix(Prefix, "-"))
	fmt.Fprintf(&b, "\t\tiif lo accept\n\t\tct state established,related accept\n\t\tct state invalid drop\n\t\tip protocol icmp accept\n")
	fmt.Fprintf(&b, "\t\tip saddr %s accept\n", mgmtNet)
	for _, a := range accept {
		fmt.Fprintf(&b, "\t\t%s\n", a)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}
