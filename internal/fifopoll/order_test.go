//go:build !race

// The race detector randomizes the scheduler's order, which this test
// checks.

package fifopoll

import (
	"net"
	"sync"
	"testing"
	"time"
)

// TestWakeOrder: goroutines waiting to read run in the order their data
// arrived (the runtime's poller would run them newest first).
func TestWakeOrder(t *testing.T) {
	const n = 16
	conns := make([]*Conn, n)
	peers := make([]net.Conn, n)
	for i := range n {
		conns[i], peers[i] = pair(t)
	}
	var mu sync.Mutex
	var order []int
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			buf := make([]byte, 1)
			if _, err := c.Read(buf); err != nil {
				t.Error(err)
			}
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
		})
	}
	time.Sleep(50 * time.Millisecond) // every reader waits
	// Writing does not yield the only P: all data is in before the
	// poller looks.
	for _, p := range peers {
		if _, err := p.Write([]byte{1}); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	for i, v := range order {
		if v != i {
			t.Fatalf("readers ran in the order %v, want 0…%d", order, n-1)
		}
	}
}
