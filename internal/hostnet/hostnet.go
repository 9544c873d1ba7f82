// Package hostnet gives each microVM its network on the node: a tap
// device, a private /30 carved from the node's VM subnet (host side .1,
// guest .2), a permanent neighbour entry for the guest (no ARP stall on
// the first request), and an nftables table that keeps VMs from reaching
// each other, the node's own services and its private networks, with
// optional egress NAT to the outside world.
//
// Leases are persisted (one file per VM, written atomically) so a
// restarted agent finds its VMs' addresses; an address is never handed
// out while a lease holds it, and freed addresses are reused last
// (next-fit). Taps left behind by a crash are removed at Setup. All of it
// can run inside a named network namespace (Config.Netns), which is how
// the tests run it.
package hostnet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/zeitwork/zeitwork/internal/fsutil"
)

// Lease is one VM's network.
type Lease struct {
	ID      string `json:"id"`
	Slot    int    `json:"slot"`
	Tap     string `json:"tap"`
	MAC     string `json:"mac"`
	HostIP  string `json:"host_ip"`
	GuestIP string `json:"guest_ip"`
	Bits    int    `json:"bits"`
	Port    int    `json:"port"` // the app port the host may connect to
	// Egress is the one port on HostIP the guest may connect to (a
	// builder VM's egress proxy); 0 = none.
	Egress int `json:"egress,omitempty"`
}

// GuestCIDR is the guest address with its prefix length.
func (l *Lease) GuestCIDR() string { return fmt.Sprintf("%s/%d", l.GuestIP, l.Bits) }

// Config for a Manager.
type Config struct {
	Subnet    netip.Prefix // e.g. 10.100.0.0/16, carved into /30s
	StateDir  string       // leases are stored here
	EgressNAT bool         // let VMs reach the outside world through the host
	MTU       int          // tap MTU (0 = default)
	Netns     string       // named network namespace to work in ("" = the agent's)
}

// Manager allocates and tears down VM networks.
type Manager struct {
	cfg    Config
	tag    string // tap name prefix, per subnet, so several agents can share a host
	mu     sync.Mutex
	leases map[string]*Lease // by VM id
	slots  map[int]string
	next   int // next-fit allocation cursor
}

const stateFile = "allocator.json"

// New validates cfg and loads persisted leases.
func New(cfg Config) (*Manager, error) {
	if !cfg.Subnet.IsValid() || !cfg.Subnet.Addr().Is4() || cfg.Subnet.Bits() > 30 {
		return nil, fmt.Errorf("VM subnet %s must be an IPv4 prefix of /30 or larger", cfg.Subnet)
	}
	cfg.Subnet = cfg.Subnet.Masked()
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return nil, fmt.Errorf("cannot create network state directory: %w", err)
	}
	h := fnv.New32a()
	h.Write([]byte(cfg.Subnet.String() + "\x00" + cfg.Netns))
	m := &Manager{cfg: cfg, tag: fmt.Sprintf("zw%05x", h.Sum32()&0xfffff), leases: map[string]*Lease{}, slots: map[int]string{}}
	files, _ := filepath.Glob(filepath.Join(cfg.StateDir, "lease-*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var l Lease
		if json.Unmarshal(b, &l) != nil || l.ID == "" || l.Slot < 0 || l.Slot >= m.slotCount() {
			_ = os.Remove(f) // from another subnet or corrupt: nothing can use it
			continue
		}
		m.leases[l.ID] = &l
		m.slots[l.Slot] = l.ID
	}
	if b, err := os.ReadFile(filepath.Join(cfg.StateDir, stateFile)); err == nil {
		var st struct{ Next int }
		if json.Unmarshal(b, &st) == nil {
			m.next = st.Next
		}
	}
	return m, nil
}

func (m *Manager) slotCount() int { return 1 << (32 - m.cfg.Subnet.Bits()) / 4 }

// TapPrefix is the name prefix of this manager's taps.
func (m *Manager) TapPrefix() string { return m.tag }

// Table is the name of this manager's nftables table (family inet).
func (m *Manager) Table() string { return "zeitwork_" + strings.TrimPrefix(m.tag, "zw") }

// Setup installs the isolation rules and removes taps that no lease
// explains (left behind by a crash).
func (m *Manager) Setup() error {
	if err := m.installRules(); err != nil {
		return err
	}
	taps, err := m.taps()
	if err != nil {
		return err
	}
	m.mu.Lock()
	known := map[string]bool{}
	for _, l := range m.leases {
		known[l.Tap] = true
	}
	m.mu.Unlock()
	var errs []error
	for _, t := range taps {
		if !known[t] {
			errs = append(errs, m.ip("link", "del", t))
		}
	}
	return errors.Join(errs...)
}

// taps lists the links carrying this manager's prefix.
func (m *Manager) taps() ([]string, error) {
	out, err := m.output(m.ipArgs("-o", "link", "show")...)
	if err != nil {
		return nil, err
	}
	var taps []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name := strings.TrimSuffix(strings.SplitN(f[1], "@", 2)[0], ":")
		if strings.HasPrefix(name, m.tag) {
			taps = append(taps, name)
		}
	}
	return taps, nil
}

// Rules is the nftables script Setup applies (declare, delete, re-create:
// an idempotent replacement in one transaction).
func (m *Manager) Rules() string {
	t, vm := m.Table(), m.tag+"*"
	var b bytes.Buffer
	fmt.Fprintf(&b, "table inet %s\ndelete table inet %s\n", t, t)
	fmt.Fprintf(&b, "table inet %s {\n", t)
	m.mu.Lock()
	// Host → guest: only each VM's app port (health checks, proxied
	// requests) — no other process on the node reaches anything else.
	m.set(&b, "apps", "ipv4_addr . inet_service", func(l *Lease) string {
		if l.Port == 0 {
			return ""
		}
		return fmt.Sprintf("%s . %d", l.GuestIP, l.Port)
	})
	// Guest → its own host address on one port (a builder's egress proxy).
	m.set(&b, "egress", "ipv4_addr . ipv4_addr . inet_service", func(l *Lease) string {
		if l.Egress == 0 {
			return ""
		}
		return fmt.Sprintf("%s . %s . %d", l.GuestIP, l.HostIP, l.Egress)
	})
	// Guests with an egress port (builders) are forwarded nowhere, NAT or not.
	m.set(&b, "sealed", "ipv4_addr", func(l *Lease) string {
		if l.Egress == 0 {
			return ""
		}
		return l.GuestIP
	})
	m.mu.Unlock()
	fmt.Fprintf(&b, "  chain output {\n    type filter hook output priority 0; policy accept;\n")
	fmt.Fprintf(&b, "    oifname %q ip daddr . tcp dport @apps accept\n", vm)
	fmt.Fprintf(&b, "    oifname %q ct state established,related accept\n", vm)
	fmt.Fprintf(&b, "    oifname %q drop\n  }\n", vm)
	// Guest → this host: nothing but replies to connections the host opened
	// (health checks, proxied requests).
	fmt.Fprintf(&b, "  chain input {\n    type filter hook input priority 0; policy accept;\n")
	fmt.Fprintf(&b, "    iifname %q ct state established,related accept\n", vm)
	fmt.Fprintf(&b, "    iifname %q ip saddr . ip daddr . tcp dport @egress accept\n", vm)
	fmt.Fprintf(&b, "    iifname %q drop\n  }\n", vm)
	fmt.Fprintf(&b, "  chain forward {\n    type filter hook forward priority 0; policy accept;\n")
	fmt.Fprintf(&b, "    iifname %q ip saddr @sealed drop\n", vm)
	// Guest → any VM of any agent on this host.
	fmt.Fprintf(&b, "    iifname %q oifname \"zw*\" drop\n", vm)
	// Anything → guest, except replies.
	fmt.Fprintf(&b, "    oifname %q ct state established,related accept\n", vm)
	fmt.Fprintf(&b, "    oifname %q drop\n", vm)
	if m.cfg.EgressNAT {
		// Guest → the node's private networks and metadata services: never.
		fmt.Fprintf(&b, "    iifname %q ip daddr { 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/4 } drop\n", vm)
		fmt.Fprintf(&b, "    iifname %q meta nfproto ipv4 accept\n", vm)
	}
	fmt.Fprintf(&b, "    iifname %q drop\n  }\n", vm)
	if m.cfg.EgressNAT {
		fmt.Fprintf(&b, "  chain postrouting {\n    type nat hook postrouting priority srcnat;\n")
		fmt.Fprintf(&b, "    ip saddr %s oifname != \"zw*\" masquerade\n  }\n", m.cfg.Subnet)
	}
	fmt.Fprintf(&b, "}\n")
	return b.String()
}

// set writes an nftables set whose elements are elem of each lease
// (leases for which it returns "" are left out). m.mu is held.
func (m *Manager) set(b *bytes.Buffer, name, typ string, elem func(*Lease) string) {
	var elems []string
	for _, l := range m.leases {
		if e := elem(l); e != "" {
			elems = append(elems, e)
		}
	}
	sort.Strings(elems)
	fmt.Fprintf(b, "  set %s {\n    type %s\n", name, typ)
	if len(elems) > 0 {
		fmt.Fprintf(b, "    elements = { %s }\n", strings.Join(elems, ", "))
	}
	fmt.Fprintf(b, "  }\n")
}

func (m *Manager) installRules() error {
	args := []string{"nft", "-f", "-"}
	if m.cfg.Netns != "" {
		args = append([]string{"ip", "netns", "exec", m.cfg.Netns}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin = strings.NewReader(m.Rules())
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("cannot install nftables rules: %v: %s", err, strings.TrimSpace(string(out)))
	}
	if m.cfg.EgressNAT {
		args := []string{"sysctl", "-q", "-w", "net.ipv4.ip_forward=1"}
		if m.cfg.Netns != "" {
			args = append([]string{"ip", "netns", "exec", m.cfg.Netns}, args...)
		}
		if err := run(args...); err != nil {
			return fmt.Errorf("cannot enable forwarding for egress NAT: %w", err)
		}
	}
	return nil
}

// Teardown removes the isolation rules and every tap of this manager
// (for an agent leaving the node for good; not on restart).
func (m *Manager) Teardown() error {
	var errs []error
	taps, err := m.taps()
	errs = append(errs, err)
	for _, t := range taps {
		errs = append(errs, m.ip("link", "del", t))
	}
	args := []string{"nft", "delete", "table", "inet", m.Table()}
	if m.cfg.Netns != "" {
		args = append([]string{"ip", "netns", "exec", m.cfg.Netns}, args...)
	}
	errs = append(errs, run(args...))
	return errors.Join(errs...)
}

// Allocate returns id's lease, creating it and its tap when needed, and
// lets the host reach the guest on port (0 = on no port). It is
// idempotent: a restarted agent calls it again for its VMs.
func (m *Manager) Allocate(id string, port int) (*Lease, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.leases[id]
	if ok && l.Port != port {
		m.nft(fmt.Sprintf("delete element inet %s apps { %s . %d }", m.Table(), l.GuestIP, l.Port))
		l.Port = port
		b, _ := json.Marshal(l)
		if err := fsutil.WriteFile(m.leasePath(id), b, 0o644); err != nil {
			return nil, fmt.Errorf("cannot persist lease: %w", err)
		}
	}
	if !ok {
		n := m.slotCount()
		slot := -1
		for i := range n {
			s := (m.next + i) % n
			if _, used := m.slots[s]; !used {
				slot = s
				break
			}
		}
		if slot < 0 {
			return nil, fmt.Errorf("VM subnet %s is full (%d VMs)", m.cfg.Subnet, n)
		}
		l = m.lease(id, slot)
		l.Port = port
		b, _ := json.Marshal(l)
		if err := fsutil.WriteFile(m.leasePath(id), b, 0o644); err != nil {
			return nil, fmt.Errorf("cannot persist lease: %w", err)
		}
		m.leases[id], m.slots[slot] = l, id
		m.next = (slot + 1) % n
		b, _ = json.Marshal(struct{ Next int }{m.next})
		_ = fsutil.WriteFile(filepath.Join(m.cfg.StateDir, stateFile), b, 0o644)
	}
	if err := m.ensureTap(l); err != nil {
		return nil, err
	}
	if l.Port > 0 {
		if err := m.nft(fmt.Sprintf("add element inet %s apps { %s . %d }", m.Table(), l.GuestIP, l.Port)); err != nil {
			return nil, fmt.Errorf("cannot allow the app port: %w", err)
		}
	}
	return l, nil
}

// AllowEgress lets id's guest connect to port on its host address (and
// nothing else on the host); 0 takes the permission back.
func (m *Manager) AllowEgress(id string, port int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.leases[id]
	if !ok {
		return fmt.Errorf("no network lease for %s", id)
	}
	if l.Egress > 0 {
		_ = m.nft(fmt.Sprintf("delete element inet %s egress { %s . %s . %d }", m.Table(), l.GuestIP, l.HostIP, l.Egress))
	}
	l.Egress = port
	b, _ := json.Marshal(l)
	if err := fsutil.WriteFile(m.leasePath(id), b, 0o644); err != nil {
		return fmt.Errorf("cannot persist lease: %w", err)
	}
	if port > 0 {
		if err := m.nft(fmt.Sprintf("add element inet %s sealed { %s }", m.Table(), l.GuestIP)); err != nil {
			return fmt.Errorf("cannot seal builder network: %w", err)
		}
		if err := m.nft(fmt.Sprintf("add element inet %s egress { %s . %s . %d }", m.Table(), l.GuestIP, l.HostIP, port)); err != nil {
			return fmt.Errorf("cannot allow builder egress: %w", err)
		}
	}
	return nil
}

// nft runs one nft command (in the namespace, if any).
func (m *Manager) nft(command string) error {
	args := append([]string{"nft"}, strings.Fields(command)...)
	if m.cfg.Netns != "" {
		args = append([]string{"ip", "netns", "exec", m.cfg.Netns}, args...)
	}
	return run(args...)
}

func (m *Manager) leasePath(id string) string {
	return filepath.Join(m.cfg.StateDir, "lease-"+id+".json")
}

// lease computes slot's addresses; the MAC is derived from the id.
func (m *Manager) lease(id string, slot int) *Lease {
	base := m.cfg.Subnet.Addr().As4()
	n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	n += uint32(slot * 4)
	ip := func(off uint32) string {
		v := n + off
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}).String()
	}
	h := fnv.New32a()
	h.Write([]byte(id))
	s := h.Sum32()
	return &Lease{ID: id, Slot: slot, Tap: m.tag + strconv.Itoa(slot), HostIP: ip(1), GuestIP: ip(2), Bits: 30,
		MAC: fmt.Sprintf("06:5a:%02x:%02x:%02x:%02x", byte(s>>24), byte(s>>16), byte(s>>8), byte(s))}
}

func (m *Manager) ensureTap(l *Lease) error {
	if _, err := m.output(m.ipArgs("link", "show", "dev", l.Tap)...); err != nil {
		if err := m.ip("tuntap", "add", "dev", l.Tap, "mode", "tap"); err != nil {
			return err
		}
	}
	steps := [][]string{
		{"addr", "replace", fmt.Sprintf("%s/%d", l.HostIP, l.Bits), "dev", l.Tap},
		{"link", "set", "dev", l.Tap, "up"},
		{"neigh", "replace", l.GuestIP, "lladdr", l.MAC, "dev", l.Tap, "nud", "permanent"},
	}
	if m.cfg.MTU > 0 {
		steps = append(steps, []string{"link", "set", "dev", l.Tap, "mtu", strconv.Itoa(m.cfg.MTU)})
	}
	for _, s := range steps {
		if err := m.ip(s...); err != nil {
			return fmt.Errorf("cannot set up %s: %w", l.Tap, err)
		}
	}
	return nil
}

// Release removes id's tap and frees its addresses.
func (m *Manager) Release(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.leases[id]
	if !ok {
		return nil
	}
	var errs []error
	if _, err := m.output(m.ipArgs("link", "show", "dev", l.Tap)...); err == nil {
		errs = append(errs, m.ip("link", "del", "dev", l.Tap))
	}
	if l.Port > 0 {
		_ = m.nft(fmt.Sprintf("delete element inet %s apps { %s . %d }", m.Table(), l.GuestIP, l.Port))
	}
	if l.Egress > 0 {
		_ = m.nft(fmt.Sprintf("delete element inet %s egress { %s . %s . %d }", m.Table(), l.GuestIP, l.HostIP, l.Egress))
		_ = m.nft(fmt.Sprintf("delete element inet %s sealed { %s }", m.Table(), l.GuestIP))
	}
	if err := os.Remove(m.leasePath(id)); err != nil && !os.IsNotExist(err) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cannot release network of %s: %w", id, err)
	}
	delete(m.leases, id)
	delete(m.slots, l.Slot)
	return nil
}

// Lease returns id's lease, if any.
func (m *Manager) Lease(id string) (*Lease, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.leases[id]
	return l, ok
}

// Leases returns every lease.
func (m *Manager) Leases() []Lease {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Lease, 0, len(m.leases))
	for _, l := range m.leases {
		out = append(out, *l)
	}
	return out
}

func (m *Manager) ipArgs(args ...string) []string {
	if m.cfg.Netns != "" {
		return append([]string{"ip", "-n", m.cfg.Netns}, args...)
	}
	return append([]string{"ip"}, args...)
}

func (m *Manager) ip(args ...string) error { return run(m.ipArgs(args...)...) }

func (m *Manager) output(args ...string) (string, error) {
	out, err := exec.Command(args[0], args[1:]...).Output()
	if err != nil {
		return "", fmt.Errorf("%s: %w", strings.Join(args, " "), err)
	}
	return string(out), nil
}

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
