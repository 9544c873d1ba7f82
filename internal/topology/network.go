package topology

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// buildNetwork creates every namespace, link, address, route, delay and
// firewall of the layout, and each host's resolv.conf (its region's DNS
// server first). It returns the delayed core links, one per region, that
// the caller owns (even on error).
func (l *Layout) buildNetwork() (wires []*wire, err error) {
	for _, ns := range l.Namespaces() {
		if err := addNS(ns); err != nil {
			return wires, err
		}
	}
	core := l.Core
	steps := [][]string{
		// Management link: root namespace ↔ core.
		{"veth", "", Prefix + "mgmt", core, "mgmt0"},
		{"ip", "", "addr", "add", mgmtIP + "/30", "dev", Prefix + "mgmt"},
		{"ip", "", "link", "set", Prefix + "mgmt", "up"},
		{"ip", "", "route", "replace", "10.250.0.0/16", "via", mgmtPeerIP},
		{"ip", core, "addr", "add", mgmtPeerIP + "/30", "dev", "mgmt0"},
		{"ip", core, "link", "set", "mgmt0", "up"},
		// Shared services LAN: a bridge on the core.
		{"ip", core, "link", "add", "br0", "type", "bridge"},
		{"ip", core, "addr", "add", svcRouter + "/24", "dev", "br0"},
		{"ip", core, "link", "set", "br0", "up"},
		{"sysctl", core},
	}
	for _, s := range steps {
		if err := l.step(s); err != nil {
			return wires, err
		}
	}
	if err := l.attach(core, l.DB, svcRouter); err != nil {
		return wires, err
	}
	for i, r := range l.Regions {
		coreIP, rtIP := coreLink(i)
		w, err := newWire(core, "r"+r.Key, coreIP, r.Router, "up0", rtIP, r.Delay)
		if err != nil {
			return wires, err
		}
		wires = append(wires, w)
		steps := [][]string{
			{"ip", core, "route", "add", r.Subnet, "dev", "r" + r.Key},
			{"ip", r.Router, "route", "add", "default", "dev", "up0"},
			{"ip", r.Router, "link", "add", "br0", "type", "bridge"},
			{"ip", r.Router, "addr", "add", routerIP(i) + "/24", "dev", "br0"},
			{"ip", r.Router, "link", "set", "br0", "up"},
			{"sysctl", r.Router},
		}
		for _, s := range steps {
			if err := l.step(s); err != nil {
				return wires, err
			}
		}
		for _, h := range r.Hosts {
			if err := l.attach(r.Router, h, routerIP(i)); err != nil {
				return wires, err
			}
		}
	}
	return wires, nil
}

func routerIP(i int) string { return fmt.Sprintf("10.250.%d.1", 1+i) }

func (l *Layout) step(s []string) error {
	switch s[0] {
	case "veth":
		return veth(s[1], s[2], s[3], s[4])
	case "ip":
		if s[1] == "" {
			return run("ip", s[2:]...)
		}
		return ipn(s[1], s[2:]...)
	case "sysctl":
		return inNS(s[1], "sysctl", "-qw", "net.ipv4.ip_forward=1")
	}
	return fmt.Errorf("unknown step %q", s[0])
}

// attach connects host h to the bridge br0 of namespace router, gives it
// its address, a default route, its firewall and its resolv.conf.
func (l *Layout) attach(router string, h *Host, gw string) error {
	port := "v" + strings.TrimPrefix(h.Name, Prefix)
	steps := [][]string{
		{"veth", router, port, h.Name, "eth0"},
		{"ip", router, "link", "set", port, "master", "br0", "up"},
		{"ip", h.Name, "addr", "add", h.IP + "/24", "dev", "eth0"},
		{"ip", h.Name, "link", "set", "eth0", "up"},
		{"ip", h.Name, "route", "add", "default", "via", gw},
	}
	for _, s := range steps {
		if err := l.step(s); err != nil {
			return err
		}
	}
	if err := runIn([]byte(l.Firewall(h)), "ip", "netns", "exec", h.Name, "nft", "-f", "-"); err != nil {
		return err
	}
	return l.writeResolvConf(h)
}

// writeResolvConf points the host's resolver at its region's DNS server,
// then the other regions' (shared hosts: every region's).
func (l *Layout) writeResolvConf(h *Host) error {
	var b strings.Builder
	add := func(i int) {
		for _, d := range l.Regions[i].Of(RoleDNS) {
			fmt.Fprintf(&b, "nameserver %s\n", d.IP)
		}
	}
	if h.Region >= 0 {
		add(h.Region)
	}
	for i := range l.Regions {
		if i != h.Region {
			add(i)
		}
	}
	b.WriteString("options timeout:1 attempts:2\n")
	dir := filepath.Join("/etc/netns", h.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(b.String()), 0o644)
}

// addDB2 creates the second PostgreSQL host (for a move of the database
// to another address).
func (l *Layout) addDB2() error {
	if err := addNS(l.DB2.Name); err != nil {
		return err
	}
	return l.attach(l.Core, l.DB2, svcRouter)
}
