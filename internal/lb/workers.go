package lb

import "sync"

// workers runs functions on reused goroutines. Relaying a connection grows
// a goroutine's stack (dialing and splicing are deep call chains); a fresh
// goroutine per connection pays for that growth every time, a reused one
// only once. Up to maxIdle goroutines wait for work; the rest exit.
type workers struct {
	tasks   chan func()
	stop    chan struct{}
	maxIdle int

	mu   sync.Mutex
	idle int
	wg   sync.WaitGroup
}

func newWorkers(maxIdle int) *workers {
	return &workers{tasks: make(chan func()), stop: make(chan struct{}), maxIdle: maxIdle}
}

// Go runs f on an idle worker, or on a new one when none is idle.
func (w *workers) Go(f func()) {
	select {
	case w.tasks <- f:
	default:
		w.wg.Add(1)
		go w.run(f)
	}
}

func (w *workers) run(f func()) {
	defer w.wg.Done()
	for {
		f()
		w.mu.Lock()
		if w.idle >= w.maxIdle {
			w.mu.Unlock()
			return
		}
		w.idle++
		w.mu.Unlock()
		select {
		case f = <-w.tasks:
			w.mu.Lock()
			w.idle--
			w.mu.Unlock()
		case <-w.stop:
			return
		}
	}
}

// Close lets idle workers exit and waits for all to finish their work.
func (w *workers) Close() {
	close(w.stop)
	w.wg.Wait()
}
