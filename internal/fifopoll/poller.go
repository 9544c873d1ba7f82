// Package fifopoll runs TCP connections on epoll instances of its own
// instead of the runtime's network poller, for servers whose tail latency
// depends on the order in which ready connections are served.
//
// The runtime's poller hands back each batch of ready goroutines newest
// first, so under load the connection that became ready first in a batch
// is served last; and a reader must try a read (a system call that finds
// nothing) before it may wait. Here a poller goroutine waits for its epoll
// instance through the runtime's poller (one descriptor), takes the ready
// connections in the order the kernel reports them and wakes their
// goroutines in that order; a read that came back short is known to have
// emptied the socket, so the next one waits for readiness first, as an
// edge-triggered event loop (nginx's) does.
//
// A Conn of a multiplexed protocol may also batch its writes: what is
// written during one scheduling round goes out in one system call when
// the round ends (BatchWrites, batch.go).
//
// A Conn is a net.Conn: deadlines, Close from another goroutine, EOF and
// errors behave as on a *net.TCPConn. The pollers (one per P at first
// use) live as long as the process, as the runtime's own poller does.
package fifopoll

import (
	"errors"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/epoll"
)

const (
	pollEvents  = 128 // events one epoll_wait returns at most
	pollBatches = 4   // full batches taken before the poller yields
)

// poller is one epoll instance and the goroutine that serves it.
type poller struct {
	ep *epoll.Instance

	mu    sync.Mutex
	conns map[int32]*Conn // by descriptor

	events  [pollEvents]unix.EpollEvent
	wake    []chan struct{} // one batch's wake-ups, in the kernel's order
	waitErr error           // epoll_pwait's failure (the poller goroutine's)
	failed  error           // why the poller stopped (under mu)

	// Batched writes (batch.go): connections whose batch waits for the
	// end of the round, and the eventfd the round's first one signals.
	efd    int
	flushq []*Conn // under mu
	kicked bool    // under mu
}

var (
	setup   sync.Once
	pollers []*poller
	errInit error
	next    atomic.Uint32
)

// start makes the pollers, once.
func start() error {
	setup.Do(func() {
		for range runtime.GOMAXPROCS(0) {
			p, err := newPoller()
			if err != nil {
				for _, p := range pollers {
					_ = unix.Close(p.efd)
					_ = p.ep.File.Close()
				}
				pollers, errInit = nil, err
				return
			}
			pollers = append(pollers, p)
		}
		for _, p := range pollers {
			go p.run() // for the life of the process
		}
	})
	return errInit
}

func newPoller() (*poller, error) {
	ep, err := epoll.Open()
	if err != nil {
		return nil, err
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_ = ep.File.Close()
		return nil, os.NewSyscallError("eventfd", err)
	}
	// Never read: each write is an edge, and the counter cannot fill.
	if err := unix.EpollCtl(ep.FD, unix.EPOLL_CTL_ADD, efd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(efd)}); err != nil {
		_ = unix.Close(efd)
		_ = ep.File.Close()
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	return &poller{ep: ep, efd: efd, conns: map[int32]*Conn{}}, nil
}

// run serves the poller's events; an epoll failure (which would be a bug)
// fails every connection of the poller and every later one.
func (p *poller) run() {
	var err error
	for err == nil && p.waitErr == nil {
		err = p.ep.RC.Read(p.poll)
		runtime.Gosched() // after pollBatches full batches: let the woken run
	}
	if err == nil {
		err = p.waitErr
	}
	p.mu.Lock()
	p.failed = errors.Join(errors.New("fifopoll: poller failed"), err)
	for _, c := range p.conns {
		c.fail()
	}
	p.mu.Unlock()
}

// poll takes ready events until none is left, then lets the runtime's
// poller wait for the epoll descriptor (false); true leaves RC.Read, after
// an epoll failure or pollBatches full batches.
func (p *poller) poll(uintptr) bool {
	for range pollBatches {
		n, err := p.ep.Wait(p.events[:])
		if err != nil {
			p.waitErr = err
			return true
		}
		p.dispatch(n)
		if n < pollEvents {
			return false
		}
	}
	return true
}

// dispatch wakes the goroutines waiting on the n ready events in the
// kernel's order. A woken goroutine goes to the runtime's "run next" slot
// and pushes the previous one to the tail of the run queue, so the first
// one is woken last: it then runs first, and the others follow in order.
// A wake-up for a goroutine that is not waiting is left at once.
func (p *poller) dispatch(n int) {
	p.wake = p.wake[:0]
	p.mu.Lock()
	for i := range n {
		ev := &p.events[i]
		if ev.Fd == int32(p.efd) { // the round ended: wake the flushers of its batches
			for _, c := range p.flushq {
				p.wake = append(p.wake, c.b.kick)
			}
			clear(p.flushq)
			p.flushq, p.kicked = p.flushq[:0], false
			continue
		}
		c := p.conns[ev.Fd]
		if c == nil {
			continue // closed since
		}
		if end := ev.Events & (unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR); end != 0 {
			c.ended.Or(end)
		}
		if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			p.queue(c.rwake, &c.rdl)
		}
		if ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			p.queue(c.wwake, &c.wdl)
		}
	}
	p.mu.Unlock()
	if len(p.wake) == 0 {
		return
	}
	for _, ch := range p.wake[1:] {
		signal(ch)
	}
	signal(p.wake[0])
}

func (p *poller) queue(ch chan struct{}, d *deadline) {
	if d.waiting.Load() {
		p.wake = append(p.wake, ch)
	} else {
		signal(ch)
	}
}

// signal leaves a wake-up in ch (capacity 1) unless one is pending.
func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// add registers c (edge-triggered, for reading and writing).
func (p *poller) add(c *Conn) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failed != nil {
		return p.failed
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(c.fd)}
	if err := unix.EpollCtl(p.ep.FD, unix.EPOLL_CTL_ADD, c.fd, &ev); err != nil {
		return os.NewSyscallError("epoll_ctl", err)
	}
	p.conns[int32(c.fd)] = c
	return nil
}

// failure is why the poller stopped, or nil.
func (p *poller) failure() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.failed
}

// remove deregisters c; its descriptor is closed after.
func (p *poller) remove(c *Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns[int32(c.fd)] == c {
		delete(p.conns, int32(c.fd))
		_ = unix.EpollCtl(p.ep.FD, unix.EPOLL_CTL_DEL, c.fd, nil)
	}
}

// Adopt moves a TCP connection onto a poller: its descriptor is
// duplicated and tc closed (which takes it out of the runtime's poller).
// On error tc is left as it was.
func Adopt(tc *net.TCPConn) (*Conn, error) {
	if err := start(); err != nil {
		return nil, err
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, os.NewSyscallError("fcntl", derr)
	}
	c := newConn(fd, tc.LocalAddr(), tc.RemoteAddr())
	c.p = pollers[next.Add(1)%uint32(len(pollers))]
	if err := c.p.add(c); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	_ = tc.Close()
	return c, nil
}
