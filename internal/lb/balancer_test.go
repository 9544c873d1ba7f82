package lb

import (
	"fmt"
	"net"
	"strings"
	"testing"
)

func pool(t *testing.T, alg string, n int) *Pool {
	t.Helper()
	p, err := NewPool(alg)
	if err != nil {
		t.Fatal(err)
	}
	var addrs []string
	for i := range n {
		addrs = append(addrs, fmt.Sprintf("10.0.0.%d:443", i+1))
	}
	p.Set(addrs)
	return p
}

func TestRoundRobinIsEven(t *testing.T) {
	p := pool(t, RoundRobin, 3)
	counts := map[string]int{}
	for range 3000 {
		counts[p.Pick(net.IPv4(1, 2, 3, 4), nil).Addr]++
	}
	for a, c := range counts {
		if c != 1000 {
			t.Errorf("%s got %d of 3000, want 1000", a, c)
		}
	}
	// A drained backend gets nothing; the others share evenly.
	p.Backends()[0].draining.Store(true)
	counts = map[string]int{}
	for range 2000 {
		counts[p.Pick(nil, nil).Addr]++
	}
	if counts["10.0.0.1:443"] != 0 || len(counts) != 2 {
		t.Fatalf("after drain: %v", counts)
	}
	for _, c := range counts {
		if c < 900 || c > 1100 {
			t.Fatalf("uneven after drain: %v", counts)
		}
	}
}

// TestLeastConnectionsUnevenHoldTimes simulates connections that are held
// for different times: the backend holding long connections must receive
// fewer new ones.
func TestLeastConnectionsUnevenHoldTimes(t *testing.T) {
	p := pool(t, LeastConnections, 3)
	type held struct {
		b     *Backend
		until int
	}
	var open []held
	counts := map[string]int{}
	for tick := range 3000 {
		kept := open[:0]
		for _, h := range open {
			if h.until > tick {
				kept = append(kept, h)
			} else {
				h.b.active.Add(-1)
			}
		}
		open = kept
		b := p.Pick(nil, nil)
		counts[b.Addr]++
		b.active.Add(1)
		hold := 3
		if b.Addr == "10.0.0.1:443" { // slow backend: connections last 10x longer
			hold = 30
		}
		open = append(open, held{b, tick + hold})
	}
	slow, fast := counts["10.0.0.1:443"], counts["10.0.0.2:443"]
	if slow*3 > fast {
		t.Fatalf("slow backend got %d, fast %d: least-connections should favour the fast one", slow, fast)
	}
}

func TestIPHashStickyAndMinimalMovement(t *testing.T) {
	p := pool(t, IPHash, 4)
	const clients = 4000
	before := map[string]string{}
	counts := map[string]int{}
	for i := range clients {
		ip := net.IPv4(100, byte(i>>16), byte(i>>8), byte(i))
		b := p.Pick(ip, nil).Addr
		if again := p.Pick(ip, nil).Addr; again != b {
			t.Fatalf("client %s moved from %s to %s without change", ip, b, again)
		}
		before[ip.String()] = b
		counts[b]++
	}
	for a, c := range counts {
		if c < clients/4*7/10 || c > clients/4*13/10 {
			t.Errorf("backend %s has %d clients of %d; want about a quarter", a, c, clients)
		}
	}
	// Remove one backend: only its clients move.
	p.Set([]string{"10.0.0.1:443", "10.0.0.2:443", "10.0.0.3:443"})
	moved := 0
	for ip, was := range before {
		now := p.Pick(net.ParseIP(ip), nil).Addr
		if now != was {
			moved++
			if was != "10.0.0.4:443" {
				t.Fatalf("client %s moved from surviving backend %s to %s", ip, was, now)
			}
		}
	}
	if moved != counts["10.0.0.4:443"] {
		t.Fatalf("moved %d clients, want exactly the %d of the removed backend", moved, counts["10.0.0.4:443"])
	}
	// Add a fifth backend: about 1/5 of clients move, all to it.
	p.Set([]string{"10.0.0.1:443", "10.0.0.2:443", "10.0.0.3:443", "10.0.0.4:443", "10.0.0.5:443"})
	moved = 0
	for ip := range before {
		b3 := before[ip]
		now := p.Pick(net.ParseIP(ip), nil).Addr
		if now != b3 && now != "10.0.0.5:443" && b3 != "10.0.0.4:443" {
			t.Fatalf("client %s moved to %s, not to the new backend", ip, now)
		}
		if now == "10.0.0.5:443" {
			moved++
		}
	}
	if moved < clients/5*6/10 || moved > clients/5*14/10 {
		t.Fatalf("%d of %d clients moved to the new backend; want about 1/5", moved, clients)
	}
	// The mapping has no per-process seed: a second pool (another
	// balancer of the region, or another listener with another target
	// port) sends every client to the same host.
	other := pool(t, IPHash, 5)
	var ports []string
	for _, b := range other.Backends() {
		ports = append(ports, strings.Replace(b.Addr, ":443", ":8083", 1))
	}
	other.Set(ports)
	for ip := range before {
		a, b := p.Pick(net.ParseIP(ip), nil).Addr, other.Pick(net.ParseIP(ip), nil).Addr
		if hostOf(a) != hostOf(b) {
			t.Fatalf("client %s: %s on one pool, %s on another", ip, a, b)
		}
	}
}

func TestPickSkipsTriedAndUnhealthy(t *testing.T) {
	for _, alg := range Algorithms {
		p := pool(t, alg, 3)
		bs := p.Backends()
		bs[1].healthy.Store(false)
		tried := []*Backend{}
		for range 2 {
			b := p.Pick(net.IPv4(5, 5, 5, 5), tried)
			if b == nil || b == bs[1] {
				t.Fatalf("%s: picked %v", alg, b)
			}
			tried = append(tried, b)
		}
		if b := p.Pick(net.IPv4(5, 5, 5, 5), tried); b != nil {
			t.Fatalf("%s: picked %s with everything tried or down", alg, b.Addr)
		}
	}
}

func TestParseListeners(t *testing.T) {
	ls, err := ParseListeners(":8082=>443, 8085=>8083,127.0.0.1:9000=>80")
	if err != nil || len(ls) != 3 || ls[1].Addr != ":8085" || ls[1].TargetPort != 8083 || ls[2].Addr != "127.0.0.1:9000" {
		t.Fatalf("ParseListeners = %+v, %v", ls, err)
	}
	for _, bad := range []string{"", ":8082", ":8082=>0", "x=>443", ":99999=>443", ":8082=>http"} {
		if _, err := ParseListeners(bad); err == nil {
			t.Errorf("ParseListeners(%q) accepted", bad)
		}
	}
}

func FuzzParseListeners(f *testing.F) {
	for _, s := range []string{":8082=>443", "8082=>443,:80=>8083", "[::1]:1=>2", "a=>b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ls, err := ParseListeners(s)
		if err != nil {
			return
		}
		for _, l := range ls {
			if l.TargetPort < 1 || l.TargetPort > 65535 {
				t.Fatalf("accepted target port %d", l.TargetPort)
			}
			if _, _, err := net.SplitHostPort(l.Addr); err != nil {
				t.Fatalf("accepted listen address %q", l.Addr)
			}
		}
	})
}
