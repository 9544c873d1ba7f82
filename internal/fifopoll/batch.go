package fifopoll

import (
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Batched writes. A multiplexed protocol (HTTP/2) writes each frame of
// each stream as it comes — a response's HEADERS, then its DATA, each
// flushed alone — and every write to a loopback or LAN socket runs the
// TCP stack. After BatchWrites, what is written during one scheduling
// round is gathered and goes out in one system call when the round ends:
// when every goroutine that was ready has run, the runtime looks at the
// network and finds the poller's eventfd, which the first write of the
// round signalled, and the poller wakes the connection's flusher. That is
// when an event loop (nginx's) writes too: after handling the batch of
// events it woke for.

// batchMax is how much a connection gathers before writers wait for its
// flusher.
const batchMax = 64 << 10

// closeFlush bounds the final flush of Close when no write deadline is set.
const closeFlush = 5 * time.Second

type batch struct {
	started bool
	buf     []byte // gathered (under bmu)
	spare   []byte
	err     error // a failed flush, returned by the next writes
	queued  bool  // in the poller's flush queue
	stopped bool  // Close or CloseWrite began: writes go to the socket
	kick    chan struct{}
	room    chan struct{} // a flush went out
	stop    chan struct{}
	exited  chan struct{}
}

// BatchWrites makes c gather its writes and write them at the end of each
// scheduling round; a writer waits only when 64 KiB are pending. An error
// writing a batch is returned by the writes after it. Close and CloseWrite
// first write what is pending (Close waits for it until the write
// deadline, or 5 s without one).
func (c *Conn) BatchWrites() {
	c.bmu.Lock()
	defer c.bmu.Unlock()
	if c.b.started || c.closed.Load() {
		return
	}
	c.b = batch{started: true, kick: make(chan struct{}, 1), room: make(chan struct{}, 1),
		stop: make(chan struct{}), exited: make(chan struct{})}
	c.batching.Store(true)
	go c.flusher() // until stopBatching
}

func (c *Conn) writeBatched(b []byte) (int, error) {
	c.bmu.Lock()
	for {
		switch {
		case c.b.stopped:
			c.bmu.Unlock()
			return c.writeNow(b)
		case c.b.err != nil:
			err := c.b.err
			c.bmu.Unlock()
			return 0, err
		}
		if err := c.check("write", &c.wdl); err != nil {
			c.bmu.Unlock()
			return 0, err
		}
		if len(c.b.buf) < batchMax {
			break
		}
		c.bmu.Unlock()
		c.wait(c.b.room, &c.wdl) // the flusher signals room, also on its way out
		c.bmu.Lock()
	}
	c.b.buf = append(c.b.buf, b...)
	queue := !c.b.queued
	c.b.queued = true
	c.bmu.Unlock()
	if queue {
		c.p.flushLater(c)
	}
	return len(b), nil
}

// flusher writes each round's batch when the poller says the round ended.
func (c *Conn) flusher() {
	defer close(c.b.exited)
	for {
		last := false
		select {
		case <-c.b.kick:
		case <-c.b.stop:
			last = true
		case <-c.done:
			return
		}
		c.bmu.Lock()
		out := c.b.buf
		c.b.buf, c.b.queued = c.b.spare[:0], false
		c.bmu.Unlock()
		if len(out) > 0 {
			_, err := c.writeNow(out)
			c.bmu.Lock()
			if err != nil && c.b.err == nil {
				c.b.err = err
			}
			if cap(out) <= batchMax { // a burst's large buffer is not kept
				c.b.spare = out[:0]
			}
			c.bmu.Unlock()
		}
		signal(c.b.room)
		if last {
			return
		}
	}
}

// stopBatching writes what is gathered and returns c to direct writes.
func (c *Conn) stopBatching() {
	if !c.batching.Load() {
		return
	}
	c.bmu.Lock()
	if c.b.stopped {
		c.bmu.Unlock()
		<-c.b.exited
		return
	}
	c.b.stopped = true
	c.batching.Store(false)
	c.bmu.Unlock()
	if c.wdl.expired() == nil {
		c.wdl.set(time.Now().Add(closeFlush))
	}
	close(c.b.stop)
	<-c.b.exited
}

// flushLater queues c's batch for the end of the round, signalling the
// eventfd for the round's first.
func (p *poller) flushLater(c *Conn) {
	p.mu.Lock()
	p.flushq = append(p.flushq, c)
	kick := !p.kicked
	p.kicked = true
	p.mu.Unlock()
	if kick {
		one := uint64(1)
		_, _, _ = unix.RawSyscall(unix.SYS_WRITE, uintptr(p.efd), uintptr(unsafe.Pointer(&one)), 8)
	}
}
