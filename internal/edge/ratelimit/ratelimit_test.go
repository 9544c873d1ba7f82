package ratelimit

import (
	"fmt"
	"testing"
	"testing/synctest"
	"time"
)

func TestGCRA(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := New(10, 5, 100) // 10/s, burst 5
		ok := 0
		for range 20 {
			if a, _ := l.Allow("a", time.Now()); a {
				ok++
			}
		}
		if ok != 5 {
			t.Fatalf("burst allowed %d, want 5", ok)
		}
		a, wait := l.Allow("a", time.Now())
		if a || wait <= 0 || wait > 100*time.Millisecond {
			t.Fatalf("over limit: allowed=%v wait=%v", a, wait)
		}
		if a, _ := l.Allow("b", time.Now()); !a {
			t.Fatal("another client is limited")
		}
		time.Sleep(wait)
		if a, _ := l.Allow("a", time.Now()); !a {
			t.Fatal("not allowed after Retry-After")
		}
		// Sustained: 10 per second.
		start, n := time.Now(), 0
		for time.Since(start) < 2*time.Second {
			if a, _ := l.Allow("a", time.Now()); a {
				n++
			}
			time.Sleep(10 * time.Millisecond)
		}
		if n < 19 || n > 21 {
			t.Fatalf("sustained rate: %d in 2s, want ~20", n)
		}
		if top := l.Top(1); len(top) != 1 || top[0].Key != "a" {
			t.Fatalf("top = %+v", top)
		}
	})
}

func TestBoundedMemory(t *testing.T) {
	l := New(1, 1, 1000)
	now := time.Now()
	for i := range 10000 {
		l.Allow(fmt.Sprint(i), now)
	}
	if l.Len() != 1000 {
		t.Fatalf("tracking %d keys, want 1000", l.Len())
	}
}
