package hostnet

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// netns creates a network namespace for the test and removes it after.
func netns(t *testing.T) string {
	t.Helper()
	if os.Getuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("hostnet tests need root on CI")
		}
		t.Skip("needs root (network namespaces, taps, nftables)")
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := "zwtest-" + hex.EncodeToString(b[:])
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	return name
}

func in(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestManager runs the whole lifecycle in a fresh network namespace:
// rules, taps with addresses and permanent neighbour entries, distinct
// persisted leases, exhaustion, next-fit reuse, restart, stale taps, and
// removal of everything.
func TestManager(t *testing.T) {
	ns := netns(t)
	state := t.TempDir()
	cfg := Config{Subnet: netip.MustParsePrefix("10.77.0.0/28"), StateDir: state, EgressNAT: true, MTU: 1400, Netns: ns}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Setup(); err != nil {
		t.Fatal(err)
	}
	rules := in(t, ns, "nft", "list", "table", "inet", m.Table())
	for _, want := range []string{"masquerade", "ip daddr . tcp dport @apps accept", `iifname "` + m.TapPrefix() + `*" drop`, `oifname "zw*" drop`, "ct state established,related accept"} {
		if !strings.Contains(rules, want) {
			t.Errorf("rules lack %q:\n%s", want, rules)
		}
	}
	if v := strings.TrimSpace(in(t, ns, "sysctl", "-n", "net.ipv4.ip_forward")); v != "1" {
		t.Errorf("ip_forward = %s with egress NAT", v)
	}

	// A /28 holds four /30s.
	ids := []string{"a", "b", "c", "d"}
	leases := map[string]*Lease{}
	seen := map[string]bool{}
	for _, id := range ids {
		l, err := m.Allocate(id, 8080)
		if err != nil {
			t.Fatal(err)
		}
		if seen[l.GuestIP] || seen[l.Tap] || seen[l.MAC] {
			t.Fatalf("lease %+v reuses an address, tap or MAC", l)
		}
		seen[l.GuestIP], seen[l.Tap], seen[l.MAC] = true, true, true
		leases[id] = l
		if !netip.MustParsePrefix("10.77.0.0/28").Contains(netip.MustParseAddr(l.GuestIP)) {
			t.Fatalf("guest %s outside the subnet", l.GuestIP)
		}
		addr := in(t, ns, "ip", "-o", "addr", "show", "dev", l.Tap)
		if !strings.Contains(addr, l.HostIP+"/30") {
			t.Fatalf("tap %s: %s", l.Tap, addr)
		}
		neigh := in(t, ns, "ip", "neigh", "show", "dev", l.Tap)
		if !strings.Contains(neigh, l.GuestIP+" lladdr "+l.MAC+" PERMANENT") {
			t.Fatalf("neighbour entry: %q", neigh)
		}
		if link := in(t, ns, "ip", "-o", "link", "show", "dev", l.Tap); !strings.Contains(link, "mtu 1400") {
			t.Fatalf("mtu: %s", link)
		}
	}
	if again, err := m.Allocate("a", 8080); err != nil || *again != *leases["a"] {
		t.Fatalf("allocate is not idempotent: %+v %v", again, err)
	}
	if _, err := m.Allocate("e", 8080); err == nil || !strings.Contains(err.Error(), "full") {
		t.Fatalf("fifth lease in a /28: %v", err)
	}

	// Release frees the tap and the slot; a restart keeps the others.
	if err := m.Release("b"); err != nil {
		t.Fatal(err)
	}
	if exec.Command("ip", "-n", ns, "link", "show", "dev", leases["b"].Tap).Run() == nil {
		t.Fatal("released tap still exists")
	}
	if _, err := os.Stat(filepath.Join(state, "lease-b.json")); !os.IsNotExist(err) {
		t.Fatal("released lease still persisted")
	}
	// A stale tap with this manager's prefix, as a crash would leave.
	stale := m.TapPrefix() + "999"
	in(t, ns, "ip", "tuntap", "add", "dev", stale, "mode", "tap")

	m2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m2.Setup(); err != nil {
		t.Fatal(err)
	}
	if exec.Command("ip", "-n", ns, "link", "show", "dev", stale).Run() == nil {
		t.Fatal("stale tap survived Setup")
	}
	for _, id := range []string{"a", "c", "d"} {
		l, ok := m2.Lease(id)
		if !ok || *l != *leases[id] {
			t.Fatalf("lease %s after restart: %+v", id, l)
		}
		if exec.Command("ip", "-n", ns, "link", "show", "dev", l.Tap).Run() != nil {
			t.Fatalf("Setup removed the tap of live lease %s", id)
		}
	}
	e, err := m2.Allocate("e", 9000)
	if err != nil {
		t.Fatal(err)
	}
	// The host may reach each guest on its app port only: the set holds the
	// live leases (re-created by Setup after the restart) and not b's.
	set := in(t, ns, "nft", "list", "set", "inet", m.Table(), "apps")
	for _, id := range []string{"a", "c", "d"} {
		if !strings.Contains(set, leases[id].GuestIP+" . 8080") {
			t.Errorf("apps set lacks %s:\n%s", id, set)
		}
	}
	if !strings.Contains(set, e.GuestIP+" . 9000") || strings.Count(set, "10.77.") != 4 {
		t.Errorf("apps set after release and reuse:\n%s", set)
	}
	if e.GuestIP != leases["b"].GuestIP {
		t.Fatalf("e got %s; the only free slot is b's %s", e.GuestIP, leases["b"].GuestIP)
	}

	// Teardown leaves nothing.
	if err := m2.Teardown(); err != nil {
		t.Fatal(err)
	}
	if out := in(t, ns, "ip", "-o", "link", "show"); strings.Contains(out, m.TapPrefix()) {
		t.Fatalf("taps left after teardown: %s", out)
	}
	if exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "inet", m.Table()).Run() == nil {
		t.Fatal("nftables table left after teardown")
	}
}

// TestNextFit: a released address is not handed out again while others
// have never been used.
func TestNextFit(t *testing.T) {
	ns := netns(t)
	m, err := New(Config{Subnet: netip.MustParsePrefix("10.78.0.0/24"), StateDir: t.TempDir(), Netns: ns})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Setup(); err != nil {
		t.Fatal(err)
	}
	a, err := m.Allocate("a", 8080)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Release("a"); err != nil {
		t.Fatal(err)
	}
	b, err := m.Allocate("b", 0)
	if err != nil {
		t.Fatal(err)
	}
	if b.GuestIP == a.GuestIP {
		t.Fatalf("address %s reused at once", a.GuestIP)
	}
	for _, bad := range []string{"10.0.0.0/31", "fd00::/64"} {
		if _, err := New(Config{Subnet: netip.MustParsePrefix(bad), StateDir: t.TempDir()}); err == nil {
			t.Errorf("subnet %s accepted", bad)
		}
	}
}
