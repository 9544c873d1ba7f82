// Package ratelimit is a keyed GCRA (generic cell rate algorithm) limiter:
// O(1) per request, one timestamp of state per key, and memory bounded by
// an LRU of keys — the shape a per-client-IP limiter at the edge needs.
package ratelimit

import (
	"container/list"
	"sort"
	"sync"
	"time"
)

// Limiter allows Rate requests per second per key with bursts of Burst.
type Limiter struct {
	interval time.Duration // emission interval: 1/rate
	tau      time.Duration // burst tolerance
	max      int

	mu      sync.Mutex
	entries map[string]*list.Element
	lru     *list.List
}

type entry struct {
	key     string
	tat     time.Time // theoretical arrival time
	limited uint64
}

// New returns a limiter; maxKeys bounds memory (least recently seen keys
// are forgotten first, which only ever makes the limiter more lenient).
func New(rate float64, burst int, maxKeys int) *Limiter {
	if rate <= 0 {
		rate = 1
	}
	if burst < 1 {
		burst = 1
	}
	interval := time.Duration(float64(time.Second) / rate)
	return &Limiter{interval: interval, tau: interval * time.Duration(burst-1), max: maxKeys, entries: map[string]*list.Element{}, lru: list.New()}
}

// Allow reports whether a request for key at now is within the limit and,
// if not, how long until it would be.
func (l *Limiter) Allow(key string, now time.Time) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var e *entry
	if el, ok := l.entries[key]; ok {
		l.lru.MoveToFront(el)
		e = el.Value.(*entry)
	} else {
		e = &entry{key: key, tat: now}
		l.entries[key] = l.lru.PushFront(e)
		if l.lru.Len() > l.max {
			old := l.lru.Back()
			l.lru.Remove(old)
			delete(l.entries, old.Value.(*entry).key)
		}
	}
	tat := e.tat
	if tat.Before(now) {
		tat = now
	}
	if allowAt := tat.Add(-l.tau); now.Before(allowAt) {
		e.limited++
		return false, allowAt.Sub(now)
	}
	e.tat = tat.Add(l.interval)
	return true, 0
}

// Limited is one client's count of rejected requests.
type Limited struct {
	Key     string `json:"client"`
	Limited uint64 `json:"limited_requests"`
}

// Top returns up to n keys with the most rejected requests.
func (l *Limiter) Top(n int) []Limited {
	l.mu.Lock()
	var out []Limited
	for el := l.lru.Front(); el != nil; el = el.Next() {
		if e := el.Value.(*entry); e.limited > 0 {
			out = append(out, Limited{e.key, e.limited})
		}
	}
	l.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Limited > out[j].Limited })
	if len(out) > n {
		out = out[:n]
	}
	return out
}

// Len is the number of tracked keys.
func (l *Limiter) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}
