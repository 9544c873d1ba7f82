// Package lb is Zeitwork's layer-4 load balancer: it accepts TCP
// connections on public listeners and relays them, without terminating TLS,
// to the healthy edge proxies of its region, chosen by round-robin,
// least-connections or consistent hashing of the client IP. A PROXY v2
// header tells the edge proxy who the client is.
package lb

import (
	"encoding/binary"
	"errors"
	"hash/fnv"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
)

// Algorithm names accepted by LB_ALGORITHM.
const (
	RoundRobin       = "round-robin"
	LeastConnections = "least-connections"
	IPHash           = "ip-hash"
)

// Algorithms lists the valid algorithm names.
var Algorithms = []string{RoundRobin, LeastConnections, IPHash}

// Backend is one upstream address (an edge proxy's host:port).
type Backend struct {
	Addr string

	healthy      atomic.Bool
	draining     atomic.Bool
	active       atomic.Int64
	total        atomic.Uint64
	failures     atomic.Uint64 // failed connects, ever
	connectFails atomic.Int32  // failed connects in a row
	hashKey      uint64
	// dst is the address connected to: Addr itself when it is an IP
	// address, else what the health checker last resolved it to.
	dst atomic.Pointer[netip.AddrPort]

	mu      sync.Mutex // guards the health-check state below
	rise    int
	fall    int
	lastErr string
}

// connected resets the run of failed connects after a success.
func (b *Backend) connected() {
	if b.connectFails.Load() != 0 {
		b.connectFails.Store(0)
	}
}

// resolved records the address a host name resolved to.
func (b *Backend) resolved(ap netip.AddrPort) {
	if cur := b.dst.Load(); cur == nil || *cur != ap {
		b.dst.Store(&ap)
	}
}

// Usable reports whether new connections may go to b.
func (b *Backend) Usable() bool { return b.healthy.Load() && !b.draining.Load() }

// Active is the number of open connections to b.
func (b *Backend) Active() int64 { return b.active.Load() }

// Pool is the set of backends of one listener and the algorithm choosing
// among them. It is safe for concurrent use.
type Pool struct {
	algorithm string
	rr        atomic.Uint64

	mu       sync.RWMutex
	backends []*Backend // sorted by Addr
}

// NewPool returns an empty pool using algorithm.
func NewPool(algorithm string) (*Pool, error) {
	if !slices.Contains(Algorithms, algorithm) {
		return nil, errors.New("unknown algorithm " + algorithm)
	}
	return &Pool{algorithm: algorithm}, nil
}

// Algorithm returns the pool's algorithm.
func (p *Pool) Algorithm() string { return p.algorithm }

// Set replaces the backend list, keeping the state of addresses that stay.
// New backends start healthy (the checker takes them out if they are not),
// so a fresh balancer serves at once.
func (p *Pool) Set(addrs []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	old := map[string]*Backend{}
	for _, b := range p.backends {
		old[b.Addr] = b
	}
	next := make([]*Backend, 0, len(addrs))
	seen := map[string]bool{}
	for _, a := range addrs {
		if seen[a] {
			continue
		}
		seen[a] = true
		if b, ok := old[a]; ok {
			next = append(next, b)
			continue
		}
		b := &Backend{Addr: a}
		b.healthy.Store(true)
		if ap, err := netip.ParseAddrPort(a); err == nil {
			b.dst.Store(&ap)
		}
		next = append(next, b)
	}
	// IP-hash keys: the host alone, so that a client maps to the same
	// host on every listener; the whole address where hosts repeat.
	hosts := map[string]int{}
	for _, b := range next {
		hosts[hostOf(b.Addr)]++
	}
	for _, b := range next {
		if h := hostOf(b.Addr); hosts[h] == 1 {
			b.hashKey = strKey(h)
		} else {
			b.hashKey = strKey(b.Addr)
		}
	}
	slices.SortFunc(next, func(a, b *Backend) int {
		if a.Addr < b.Addr {
			return -1
		}
		if a.Addr > b.Addr {
			return 1
		}
		return 0
	})
	p.backends = next
}

// Backends returns a snapshot of the backend list.
func (p *Pool) Backends() []*Backend {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return slices.Clone(p.backends)
}

// Healthy counts usable backends.
func (p *Pool) Healthy() int {
	n := 0
	for _, b := range p.Backends() {
		if b.Usable() {
			n++
		}
	}
	return n
}

// Pick chooses a usable backend for a client, skipping those in tried. It
// returns nil when none is left.
func (p *Pool) Pick(client net.IP, tried []*Backend) *Backend {
	p.mu.RLock()
	defer p.mu.RUnlock()
	n := len(p.backends)
	if n == 0 {
		return nil
	}
	usable := func(b *Backend) bool { return b.Usable() && !slices.Contains(tried, b) }
	switch p.algorithm {
	case IPHash:
		// Rendezvous (highest random weight) hashing on the client IP only:
		// removing one of N backends moves only the clients it had (~1/N),
		// and adding one takes ~1/(N+1) from the others. The hash has no
		// per-process seed, so every balancer of a region (and every
		// listener: the backend's port is not hashed) sends a client to
		// the same edge proxy.
		ip := ipKey(client)
		var best *Backend
		var bestW uint64
		for _, b := range p.backends {
			if !usable(b) {
				continue
			}
			if w := mix(ip ^ b.hashKey); best == nil || w > bestW {
				best, bestW = b, w
			}
		}
		return best
	case LeastConnections:
		start := int(p.rr.Add(1) % uint64(n))
		var best *Backend
		for i := range n {
			b := p.backends[(start+i)%n]
			if usable(b) && (best == nil || b.active.Load() < best.active.Load()) {
				best = b
			}
		}
		return best
	default:
		// Count usable backends and take the k-th, so that skipping an
		// unusable one does not double its successor's share.
		var buf [16]*Backend
		ok := buf[:0]
		for _, b := range p.backends {
			if usable(b) {
				ok = append(ok, b)
			}
		}
		if len(ok) == 0 {
			return nil
		}
		return ok[p.rr.Add(1)%uint64(len(ok))]
	}
}

// ipKey hashes an IPv4 or IPv6 address (IPv4-mapped IPv6 equals IPv4).
func ipKey(ip net.IP) uint64 {
	b := ip.To16()
	if b == nil {
		return 0
	}
	return mix(mix(binary.BigEndian.Uint64(b[:8])) ^ binary.BigEndian.Uint64(b[8:]))
}

func hostOf(addr string) string {
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr
}

// strKey hashes s (FNV-1a, then mix).
func strKey(s string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(s))
	return mix(h.Sum64())
}

// mix is the splitmix64 finaliser, so nearby hashes spread evenly.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ (x >> 31)
}
