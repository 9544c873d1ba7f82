// Package hostnet gives each microVM its network: a tap device, a private
// /30 from the node's VM subnet (host side .1, guest .2), a permanent
// neighbour entry (no ARP stall on the first request), and nftables rules
// that keep VMs from reaching each other or the node's own services. Leases
// are persisted so addresses are never reused while a VM holds them, and
// taps left over by a crash are removed at start.
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
	"strconv"
	"strings"
	"sync"
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
}

// GuestCIDR is the guest address with its prefix length.
func (l *Lease) GuestCIDR() string { return fmt.Sprintf("%s/%d", l.GuestIP, l.Bits) }

// Config for a Manager.
type Config struct {
	Subnet    netip.Prefix // e.g. 10.100.0.0/16; carved into /30s
	StateDir  string       // leases are stored here
	EgressNAT bool         // let VMs reach the outside world through the host
	MTU       int
}

// Manager allocates and tears down VM networks.
type Manager struct {
	cfg    Config
	tag    string // per-subnet tap prefix, so several agents can share a host
	mu     sync.Mutex
	leases map[string]*Lease // by VM id
	slots  map[int]string
}

// New loads persisted leases.
func New(cfg Config) (*Manager, error) {
	if !cfg.Subnet.Addr().Is4() || cfg.Subnet.Bits() > 28 {
		return nil, fmt.Errorf("VM subnet %s must be IPv4 and at least a /28", cfg.Subnet)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return nil, err
	}
	h := fnv.New32a()
	h.Write([]byte(cfg.Subnet.Masked().String()))
	m := &Manager{cfg: cfg, tag: fmt.Sprintf("zw%05x", h.Sum32()&0xfffff), leases: map[string]*Lease{}, slots: map[int]string{}}
	files, _ := filepath.Glob(filepath.Join(cfg.StateDir, "*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var l Lease
		if json.Unmarshal(b, &l) == nil && l.ID != "" {
			m.leases[l.ID] = &l
			m.slots[l.Slot] = l.ID
		}
	}
	return m, nil
}

// TapPrefix is the name prefix of this manager's taps.
func (m *Manager) TapPrefix() string { return m.tag }

// Setup installs the isolation rules and removes taps that no lease
// explains (left by a crash).
func (m *Manager) Setup() error {
	if err := m.installRules(); err != nil {
		return err
	}
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		return fmt.Errorf("ip link: %w", err)
	}
	m.mu.Lock()
	known := map[string]bool{}
	for _, l := range m.leases {
		known[l.Tap] = true
	}
	m.mu.Unlock()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name := strings.TrimSuffix(strings.SplitN(f[1], "@", 2)[0], ":")
		if strings.HasPrefix(name, m.tag) && !known[name] {
			_ = run("ip", "link", "del", name)
		}
	}
	return nil
}

func (m *Manager) table() string { return "zeitwork_" + strings.TrimPrefix(m.tag, "zw") }

func (m *Manager) installRules() error {
	t := m.table()
	var b bytes.Buffer
	// Declare, delete, re-create: idempotent replacement in one transaction.
	fmt.Fprintf(&b, "table inet %s\ndelete table inet %s\n", t, t)
	fmt.Fprintf(&b, "table inet %s {\n", t)
	fmt.Fprintf(&b, "  chain input {\n    type filter hook input priority 0; policy accept;\n")
	fmt.Fprintf(&b, "    iifname \"%s*\" ct state established,related accept\n", m.tag)
	fmt.Fprintf(&b, "    iifname \"%s*\" drop\n  }\n", m.tag)
	fmt.Fprintf(&b, "  chain forward {\n    type filter hook forward priority 0; policy accept;\n")
	fmt.Fprintf(&b, "    iifname \"%s*\" oifname \"zw*\" drop\n", m.tag)
	fmt.Fprintf(&b, "    iifname \"zw*\" oifname \"%s*\" ct state established,related accept\n", m.tag)
	fmt.Fprintf(&b, "    iifname \"zw*\" oifname \"%s*\" drop\n", m.tag)
	fmt.Fprintf(&b, "    ip daddr { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16 } iifname \"%s*\" drop\n", m.tag)
	if !m.cfg.EgressNAT {
		fmt.Fprintf(&b, "    iifname \"%s*\" drop\n", m.tag)
	}
	fmt.Fprintf(&b, "  }\n")
	if m.cfg.EgressNAT {
		fmt.Fprintf(&b, "  chain postrouting {\n    type nat hook postrouting priority 100;\n    ip saddr %s oifname != \"zw*\" masquerade\n  }\n", m.cfg.Subnet.Masked())
	}
	fmt.Fprintf(&b, "}\n")
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = &b
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft: %v: %s", err, strings.TrimSpace(string(out)))
	}
	if m.cfg.EgressNAT {
		_ = os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644)
	}
	return nil
}

// Teardown removes the isolation rules (used when the last agent on a host
// goes away for good; not on restart).
func (m *Manager) Teardown() error {
	return run("nft", "delete", "table", "inet", m.table())
}

// Allocate returns id's lease, creating its tap when needed.
func (m *Manager) Allocate(id string) (*Lease, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.leases[id]
	if !ok {
		slots := 1 << (32 - m.cfg.Subnet.Bits()) / 4
		slot := -1
		for i := 0; i < slots; i++ {
			if _, used := m.slots[i]; !used {
				slot = i
				break
			}
		}
		if slot < 0 {
			return nil, fmt.Errorf("VM subnet %s is full", m.cfg.Subnet)
		}
		base := m.cfg.Subnet.Masked().Addr().As4()
		n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
		n += uint32(slot * 4)
		ip := func(off uint32) string {
			v := n + off
			return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}).String()
		}
		h := fnv.New32a()
		h.Write([]byte(id))
		s := h.Sum32()
		l = &Lease{ID: id, Slot: slot, Tap: m.tag + strconv.Itoa(slot), HostIP: ip(1), GuestIP: ip(2), Bits: 30,
			MAC: fmt.Sprintf("06:5a:%02x:%02x:%02x:%02x", byte(s>>24), byte(s>>16), byte(s>>8), byte(s))}
		b, _ := json.Marshal(l)
		if err := os.WriteFile(filepath.Join(m.cfg.StateDir, id+".json"), b, 0o644); err != nil {
			return nil, err
		}
		m.leases[id], m.slots[slot] = l, id
	}
	if err := m.ensureTap(l); err != nil {
		return nil, err
	}
	return l, nil
}

func (m *Manager) ensureTap(l *Lease) error {
	if err := exec.Command("ip", "link", "show", l.Tap).Run(); err != nil {
		if err := run("ip", "tuntap", "add", "dev", l.Tap, "mode", "tap"); err != nil {
			return err
		}
	}
	steps := [][]string{
		{"ip", "addr", "replace", fmt.Sprintf("%s/%d", l.HostIP, l.Bits), "dev", l.Tap},
		{"ip", "link", "set", l.Tap, "up"},
		{"ip", "neigh", "replace", l.GuestIP, "lladdr", l.MAC, "dev", l.Tap, "nud", "permanent"},
	}
	if m.cfg.MTU > 0 {
		steps = append(steps, []string{"ip", "link", "set", l.Tap, "mtu", strconv.Itoa(m.cfg.MTU)})
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			return err
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
	if exec.Command("ip", "link", "show", l.Tap).Run() == nil {
		errs = append(errs, run("ip", "link", "del", l.Tap))
	}
	if err := os.Remove(filepath.Join(m.cfg.StateDir, id+".json")); err != nil && !os.IsNotExist(err) {
		errs = append(errs, err)
	}
	delete(m.leases, id)
	delete(m.slots, l.Slot)
	return errors.Join(errs...)
}

// Lease returns id's lease, if any.
func (m *Manager) Lease(id string) (*Lease, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.leases[id]
	return l, ok
}

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
