package fifopoll

import (
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Conn is a TCP connection served by a poller. Reads (and writes) are
// serialized among themselves, as on any net.Conn; a read and a write may
// run at once.
type Conn struct {
	p            *poller
	fd           int
	laddr, raddr net.Addr

	// fdmu keeps fd open while a system call uses it: calls hold it
	// shared, Close exclusively.
	fdmu   sync.RWMutex
	closed atomic.Bool
	done   chan struct{} // closed by Close (or a failed poller)
	once   sync.Once

	rmu, wmu     sync.Mutex    // one reader, one writer at a time
	rwake, wwake chan struct{} // from the poller, capacity 1
	rready       bool          // a read may find data (under rmu)
	wready       bool          // a write may find room (under wmu)
	// ended holds the poller's reports of the peer's FIN (EPOLLRDHUP), a
	// hang-up or an error: no edge follows them, so once seen, reads (and,
	// after a hang-up or error, writes) are always tried.
	ended    atomic.Uint32
	rdl, wdl deadline

	batching atomic.Bool // BatchWrites was called and Close or CloseWrite not yet
	bmu      sync.Mutex
	b        batch
}

func newConn(fd int, laddr, raddr net.Addr) *Conn {
	c := &Conn{fd: fd, laddr: laddr, raddr: raddr, done: make(chan struct{}),
		rwake: make(chan struct{}, 1), wwake: make(chan struct{}, 1), rready: true, wready: true}
	c.rdl.poke, c.wdl.poke = c.rwake, c.wwake
	return c
}

// Read reads like (*net.TCPConn).Read.
func (c *Conn) Read(b []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if len(b) == 0 {
		return 0, c.check("read", &c.rdl)
	}
	for {
		if err := c.check("read", &c.rdl); err != nil {
			return 0, err
		}
		if c.rready || c.ended.Load() != 0 {
			n, errno := c.io(unix.SYS_READ, b)
			switch {
			case errno == unix.EAGAIN:
				c.rready = false
			case errno != 0:
				return 0, c.opError("read", os.NewSyscallError("read", errno))
			case n == 0:
				return 0, io.EOF
			default:
				// A short read emptied the socket: more data is an edge
				// the poller will report.
				c.rready = n == len(b)
				return n, nil
			}
		}
		c.rready = c.wait(c.rwake, &c.rdl)
	}
}

// Write writes like (*net.TCPConn).Write: all of b unless an error ends
// it. After BatchWrites, b is gathered and written at the end of the
// scheduling round (see batch.go).
func (c *Conn) Write(b []byte) (int, error) {
	if c.batching.Load() {
		return c.writeBatched(b)
	}
	return c.writeNow(b)
}

// writeNow writes b on the socket, waiting for room as long as needed.
func (c *Conn) writeNow(b []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	written := 0
	for {
		if err := c.check("write", &c.wdl); err != nil {
			return written, err
		}
		if written == len(b) {
			return written, nil
		}
		if c.wready || c.ended.Load()&(unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			n, errno := c.io(unix.SYS_WRITE, b[written:])
			switch {
			case errno == unix.EAGAIN:
				c.wready = false
			case errno != 0:
				return written, c.opError("write", os.NewSyscallError("write", errno))
			default:
				written += n
				continue
			}
		}
		c.wready = c.wait(c.wwake, &c.wdl)
	}
}

// wait blocks until the poller reports readiness (true), d's deadline
// passes or moves, or the connection is closed. d.waiting tells the
// poller and SetDeadline that a goroutine waits.
func (c *Conn) wait(wake chan struct{}, d *deadline) bool {
	d.waiting.Store(true)
	defer d.waiting.Store(false)
	select {
	case <-wake:
		return true
	case <-d.expired():
	case <-c.done:
	}
	return false
}

// io makes one read or write system call on the descriptor while it is
// open, retried on EINTR.
func (c *Conn) io(trap uintptr, b []byte) (int, syscall.Errno) {
	c.fdmu.RLock()
	defer c.fdmu.RUnlock()
	if c.closed.Load() {
		return 0, unix.EBADF
	}
	for {
		r, _, e := unix.RawSyscall(trap, uintptr(c.fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		if e != unix.EINTR {
			return int(r), e
		}
	}
}

// check reports a closed connection or a passed deadline.
func (c *Conn) check(op string, d *deadline) error {
	if c.closed.Load() {
		return c.opError(op, net.ErrClosed)
	}
	if d.passed() {
		return c.opError(op, os.ErrDeadlineExceeded)
	}
	return nil
}

func (c *Conn) opError(op string, err error) error {
	if err == net.ErrClosed && c.p != nil {
		if failed := c.p.failure(); failed != nil {
			err = failed
		}
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.laddr, Addr: c.raddr, Err: err}
}

// Close closes the connection; blocked reads and writes return
// net.ErrClosed.
func (c *Conn) Close() error {
	c.stopBatching()
	first, err := c.release(true)
	switch {
	case !first:
		return c.opError("close", net.ErrClosed)
	case err != nil:
		return c.opError("close", os.NewSyscallError("close", err))
	}
	return nil
}

// fail ends the connection when its poller failed (under the poller's
// lock, so the descriptor is not deregistered).
func (c *Conn) fail() { _, _ = c.release(false) }

// release closes the connection once: waits end, the deadline timers
// stop, the descriptor leaves the poller (deregister) and is closed.
func (c *Conn) release(deregister bool) (first bool, err error) {
	c.once.Do(func() {
		first = true
		c.closed.Store(true)
		close(c.done)
		c.rdl.stop()
		c.wdl.stop()
		if deregister {
			c.p.remove(c)
		}
		c.fdmu.Lock()
		err = unix.Close(c.fd)
		c.fdmu.Unlock()
	})
	return first, err
}

// CloseWrite shuts down the sending side, after what was gathered.
func (c *Conn) CloseWrite() error {
	c.stopBatching()
	return c.shutdown("close", unix.SHUT_WR)
}

// CloseRead shuts down the receiving side.
func (c *Conn) CloseRead() error { return c.shutdown("close", unix.SHUT_RD) }

func (c *Conn) shutdown(op string, how int) error {
	c.fdmu.RLock()
	defer c.fdmu.RUnlock()
	if c.closed.Load() {
		return c.opError(op, net.ErrClosed)
	}
	if err := unix.Shutdown(c.fd, how); err != nil {
		return c.opError(op, os.NewSyscallError("shutdown", err))
	}
	return nil
}

func (c *Conn) LocalAddr() net.Addr  { return c.laddr }
func (c *Conn) RemoteAddr() net.Addr { return c.raddr }

func (c *Conn) SetDeadline(t time.Time) error {
	if c.closed.Load() {
		return c.opError("set", net.ErrClosed)
	}
	c.rdl.set(t)
	c.wdl.set(t)
	return nil
}

func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.closed.Load() {
		return c.opError("set", net.ErrClosed)
	}
	c.rdl.set(t)
	return nil
}

func (c *Conn) SetWriteDeadline(t time.Time) error {
	if c.closed.Load() {
		return c.opError("set", net.ErrClosed)
	}
	c.wdl.set(t)
	return nil
}

// deadline is one direction's deadline: a timer, made at the first set
// and reset after, closes the channel waits select on.
type deadline struct {
	mu    sync.Mutex
	at    time.Time // zero: none
	timer *time.Timer
	ch    chan struct{} // closed once at has passed; nil while none is set
	fired bool
	over  atomic.Bool // at has passed (read without mu on every call)

	// A goroutine waits in Conn.wait on the channel it read before a
	// change; poke (the direction's wake-up channel) makes it look again.
	waiting atomic.Bool
	poke    chan struct{}
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
	}
	d.at = t
	if d.fired {
		d.ch, d.fired = nil, false
	}
	d.over.Store(false)
	if d.waiting.Load() {
		signal(d.poke)
	}
	if t.IsZero() {
		return
	}
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	wait := time.Until(t)
	if wait <= 0 {
		d.expire()
		return
	}
	if d.timer == nil {
		d.timer = time.AfterFunc(wait, d.fire)
	} else {
		d.timer.Reset(wait)
	}
}

// fire runs when the timer goes off; a deadline moved since is left alone.
func (d *deadline) fire() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.at.IsZero() && !d.fired && !time.Now().Before(d.at) {
		d.expire()
	}
}

func (d *deadline) expire() {
	d.fired = true
	d.over.Store(true)
	close(d.ch)
}

func (d *deadline) passed() bool { return d.over.Load() }

// expired is what a wait selects on: nil (never ready) without a deadline.
func (d *deadline) expired() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ch
}

func (d *deadline) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
	}
}
