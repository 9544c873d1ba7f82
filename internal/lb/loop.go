package lb

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/epoll"
	"github.com/zeitwork/zeitwork/internal/proxyproto"
)

// The relay engine (docs/adr/0100). Connections are relayed by event
// loops, one per P (GOMAXPROCS), as HAProxy's threads do. Each loop owns
// one socket of every public listener (SO_REUSEPORT when there are several
// loops, so the kernel spreads clients over them), an epoll instance of its
// own and every connection it accepted. Its epoll descriptor waits in the
// Go runtime's poller (os.File + syscall.RawConn), so an idle loop costs a
// parked goroutine and nothing else; every system call on a connection's
// path — accept4, socket, connect, getsockopt, recvfrom, write, splice,
// shutdown, close, epoll_ctl — is a raw, non-blocking one. Nothing on the
// path goes through the runtime's blocking-syscall bookkeeping, which
// wakes the sysmon thread after an idle moment and, on a balancer pinned to
// one CPU, puts a context switch on every connection's path.

const (
	loopEvents   = 128 // events per epoll_wait
	loopBatches  = 8   // full batches before the loop lets other goroutines run
	maxFreePipes = 64  // idle pipes kept per loop
	maxFreeConns = 4096
)

// Commands from LB.Run to its loops.
const (
	cmdStopAccepting = 1 << iota
	cmdCloseAll
)

type sockKind uint8

const (
	kindClient sockKind = iota
	kindBackend
	kindListener
	kindWake
)

// sock is one descriptor registered with a loop's epoll instance. The
// registration carries the descriptor and a generation, so an event still
// queued for a descriptor that was closed and reused is recognised and
// dropped.
type sock struct {
	fd   int
	gen  int32
	kind sockKind
	// Readiness reported by the (edge-triggered) epoll instance and not
	// yet used up by a call that returned EAGAIN; hup: the peer's FIN (or
	// an error) has been reported, so an EOF is still to be read.
	readable, writable, hup bool
	c                       *conn
	ln                      *loopListener
}

// loopListener is a loop's socket of one public listener.
type loopListener struct {
	sock
	ln   *net.TCPListener
	pool *Pool
	// local is the bound address, used as the PROXY header's destination;
	// when its IP is unspecified the destination is asked per connection.
	local netip.AddrPort
	// pending: accepting stopped (connection limit, accept error) while
	// clients may still be queued.
	pending bool
	closed  bool
}

type connState uint8

const (
	stateFree connState = iota
	stateConnecting
	stateRelaying
)

// dir is one direction of a relayed connection: src → pipe → dst.
type dir struct {
	src, dst *sock
	p        *pipe // taken when bytes flow, given back when the pipe is empty and src has nothing more
	inPipe   int
	n        int64 // bytes delivered to dst
	ended    bool  // src reached EOF and dst was shut down
}

// conn is one client connection and its backend connection.
type conn struct {
	client, backend sock
	up, down        dir // client → backend, backend → client
	state           connState
	ln              *loopListener
	b               *Backend // backend connected to (or being connected to)
	tried           [3]*Backend
	attempts        int
	src, dst        netip.AddrPort // client address and the address it connected to
	deadline        int64          // connect deadline, unix nanos
	pending         []byte         // PROXY header and first client bytes not yet written
}

// timed is an entry of a deadline queue; it is stale when its connection
// has moved on (another generation, state or deadline).
type timed struct {
	c   *conn
	gen int32
	at  int64
}

// fifo is a queue of deadlines. Connect deadlines and keepalive times are
// now + a constant, so insertion order is deadline order.
type fifo struct {
	items []timed
	head  int
}

func (q *fifo) push(t timed) {
	if q.head == len(q.items) {
		q.items, q.head = q.items[:0], 0
	} else if q.head > 1024 && q.head > len(q.items)/2 {
		n := copy(q.items, q.items[q.head:])
		clear(q.items[n:])
		q.items, q.head = q.items[:n], 0
	}
	q.items = append(q.items, t)
}

func (q *fifo) peek() (timed, bool) {
	if q.head == len(q.items) {
		return timed{}, false
	}
	return q.items[q.head], true
}

func (q *fifo) pop() {
	q.items[q.head] = timed{}
	q.head++
}

// due drops the stale entries at the head (live reports false) and pops
// and returns the head if it is due by now; otherwise next is the head's
// time (0 for an empty queue).
func (q *fifo) due(now int64, live func(timed) bool) (t timed, due bool, next int64) {
	for {
		t, ok := q.peek()
		switch {
		case !ok:
			return timed{}, false, 0
		case !live(t):
			q.pop()
		case t.at > now:
			return timed{}, false, t.at
		default:
			q.pop()
			return t, true, 0
		}
	}
}

// loop is one event loop.
type loop struct {
	l        *LB
	ep       *epoll.Instance
	wake     sock         // eventfd written by LB.Run with a command; closed by Run
	cmd      atomic.Int32 // cmd* bits
	lns      []*loopListener
	socks    []*sock // by descriptor
	gen      int32
	nconns   int
	maxConns int
	stopping bool
	quit     bool
	yield    bool
	err      error

	connects, keepalives fifo
	armed                int64 // read deadline set on file (unix nanos), 0 for none
	acceptRetry          int64 // when to retry accepting after an error
	backoff              time.Duration

	pipes  []*pipe
	free   []*conn
	events [loopEvents]unix.EpollEvent
	buf    []byte // PROXY header + first client bytes
	rsa    unix.RawSockaddrAny
	rsaLen uint32
	ip     [16]byte // client IP for Pool.Pick, without allocating
}

func newLoop(l *LB, lns []*net.TCPListener, maxConns int) (*loop, error) {
	ep, err := epoll.Open()
	if err != nil {
		return nil, err
	}
	lp := &loop{l: l, ep: ep, maxConns: maxConns, buf: make([]byte, 0, 256+firstChunk)}
	wfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_ = lp.ep.File.Close()
		return nil, os.NewSyscallError("eventfd", err)
	}
	lp.wake = sock{fd: wfd, kind: kindWake}
	if err := lp.register(&lp.wake); err != nil {
		lp.closeAll()
		return nil, err
	}
	for i, ln := range lns {
		local := ln.Addr().(*net.TCPAddr).AddrPort()
		ll := &loopListener{ln: ln, pool: l.pools[i], local: netip.AddrPortFrom(local.Addr().Unmap(), local.Port())}
		ll.sock = sock{kind: kindListener, ln: ll}
		var cerr error
		rc, err := ln.SyscallConn()
		if err == nil {
			err = rc.Control(func(fd uintptr) {
				ll.fd = int(fd)
				cerr = lp.register(&ll.sock)
			})
		}
		if err != nil || cerr != nil {
			lp.closeAll()
			return nil, errors.Join(err, cerr)
		}
		lp.lns = append(lp.lns, ll)
	}
	return lp, nil
}

// closeAll releases what newLoop opened when it fails.
func (lp *loop) closeAll() {
	_ = unix.Close(lp.wake.fd)
	_ = lp.ep.File.Close()
}

// command asks the loop (from another goroutine) to act on bits.
func (lp *loop) command(bits int32) {
	lp.cmd.Or(bits)
	one := uint64(1)
	_, _ = unix.Write(lp.wake.fd, (*[8]byte)(unsafe.Pointer(&one))[:])
}

// run serves connections until told to stop and every connection is gone
// (or closed by cmdCloseAll).
func (lp *loop) run() {
	defer lp.finish()
	for !lp.quit {
		err := lp.ep.RC.Read(lp.poll)
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			lp.armed = 0
		default:
			lp.err = err
		}
		if lp.err != nil {
			lp.l.log.Error("relay loop failed", "err", lp.err)
			lp.l.failOnce.Do(func() { close(lp.l.failed) })
			return
		}
		lp.expire(time.Now().UnixNano())
		if lp.yield {
			lp.yield = false
			runtime.Gosched()
		}
	}
}

// finish closes whatever is still open when the loop ends.
func (lp *loop) finish() {
	lp.stopAccepting()
	lp.closeConns()
	_ = lp.ep.File.Close()
}

// closeConns closes every connection of the loop.
func (lp *loop) closeConns() {
	for _, s := range lp.socks {
		if s != nil && s.kind == kindClient {
			lp.close(s.c)
		}
	}
}

// poll handles ready events until none is left (false: wait for the epoll
// descriptor to become readable) or the loop must leave rc.Read (true).
func (lp *loop) poll(uintptr) bool {
	for range loopBatches {
		n, err := lp.ep.Wait(lp.events[:])
		if err != nil {
			lp.err = err
			lp.quit = true
			return true
		}
		for i := range n {
			lp.dispatch(&lp.events[i])
		}
		lp.retryAccept()
		if lp.quit {
			return true
		}
		if n < loopEvents {
			return false
		}
	}
	lp.yield = true
	return true
}

func (lp *loop) dispatch(ev *unix.EpollEvent) {
	fd := int(ev.Fd)
	if fd >= len(lp.socks) {
		return
	}
	s := lp.socks[fd]
	if s == nil || s.gen != ev.Pad {
		return
	}
	switch s.kind {
	case kindListener:
		lp.accept(s.ln)
	case kindWake:
		var b [8]byte
		_, _, _ = unix.RawSyscall(unix.SYS_READ, uintptr(s.fd), uintptr(unsafe.Pointer(&b[0])), 8)
		lp.obey()
	default:
		if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			s.readable = true
		}
		if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			s.hup = true
		}
		if ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			s.writable = true
		}
		lp.progress(s.c)
	}
}

// obey carries out the commands sent by LB.Run.
func (lp *loop) obey() {
	cmd := lp.cmd.Load()
	if cmd&cmdStopAccepting != 0 {
		lp.stopAccepting()
	}
	if cmd&cmdCloseAll != 0 {
		lp.closeConns()
		lp.quit = true
	}
	if lp.stopping && lp.nconns == 0 {
		lp.quit = true
	}
}

func (lp *loop) stopAccepting() {
	lp.stopping = true
	for _, ln := range lp.lns {
		if !ln.closed {
			ln.closed = true
			lp.socks[ln.fd] = nil
			// Deregister first: after an upgrade the next process holds the
			// same socket open, and epoll would keep reporting it here.
			_ = unix.EpollCtl(lp.ep.FD, unix.EPOLL_CTL_DEL, ln.fd, nil)
			_ = ln.ln.Close()
		}
	}
}

func (lp *loop) register(s *sock) error {
	lp.gen++
	s.gen = lp.gen
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(s.fd), Pad: s.gen}
	if s.kind == kindListener || s.kind == kindWake {
		ev.Events = unix.EPOLLIN | unix.EPOLLET
	}
	if _, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(lp.ep.FD), unix.EPOLL_CTL_ADD, uintptr(s.fd), uintptr(unsafe.Pointer(&ev)), 0, 0); e != 0 {
		return os.NewSyscallError("epoll_ctl", e)
	}
	for s.fd >= len(lp.socks) {
		lp.socks = append(lp.socks, make([]*sock, max(64, len(lp.socks)))...)
	}
	lp.socks[s.fd] = s
	return nil
}

// closeSock closes a connection's descriptor (which also takes it out of
// the epoll instance).
func (lp *loop) closeSock(s *sock) {
	if s.fd < 0 {
		return
	}
	lp.socks[s.fd] = nil
	_, _, _ = unix.RawSyscall(unix.SYS_CLOSE, uintptr(s.fd), 0, 0)
	s.fd = -1
}

// arm makes rc.Read return by at (unix nanos) at the latest.
func (lp *loop) arm(at int64) {
	if lp.armed != 0 && lp.armed <= at {
		return
	}
	lp.armed = at
	_ = lp.ep.File.SetReadDeadline(time.Unix(0, at))
}

// expire handles the deadlines that have passed: connects that take too
// long, backend connections due for keepalive, accept retries. It then
// arms the read deadline for the next one.
func (lp *loop) expire(now int64) {
	next := int64(0)
	soonest := func(at int64) {
		if at != 0 && (next == 0 || at < next) {
			next = at
		}
	}
	for {
		t, due, at := lp.connects.due(now, func(t timed) bool {
			return t.c.client.gen == t.gen && t.c.state == stateConnecting && t.c.deadline == t.at
		})
		if !due {
			soonest(at)
			break
		}
		lp.connectFailed(t.c, unix.ETIMEDOUT)
	}
	for {
		t, due, at := lp.keepalives.due(now, func(t timed) bool {
			return t.c.client.gen == t.gen && t.c.state == stateRelaying
		})
		if !due {
			soonest(at)
			break
		}
		_ = setKeepalive(t.c.backend.fd)
	}
	if lp.acceptRetry != 0 {
		if lp.acceptRetry <= now {
			lp.acceptRetry = 0
			lp.retryAccept()
		} else {
			soonest(lp.acceptRetry)
		}
	}
	lp.armed = next
	var d time.Time // zero: no deadline
	if next != 0 {
		d = time.Unix(0, next)
	}
	_ = lp.ep.File.SetReadDeadline(d)
}

// retryAccept resumes accepting on listeners that stopped (connection
// limit, accept error) once that is over.
func (lp *loop) retryAccept() {
	if lp.nconns >= lp.maxConns || lp.acceptRetry != 0 {
		return
	}
	for _, ln := range lp.lns {
		if ln.pending && !ln.closed {
			lp.accept(ln)
		}
	}
}

// accept takes every queued client of ln, up to the connection limit (as
// HAProxy's maxconn: the others wait in the kernel's backlog).
func (lp *loop) accept(ln *loopListener) {
	for !ln.closed {
		if lp.nconns >= lp.maxConns {
			ln.pending = true
			return
		}
		lp.rsaLen = unix.SizeofSockaddrAny
		fd, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(ln.fd), uintptr(unsafe.Pointer(&lp.rsa)), uintptr(unsafe.Pointer(&lp.rsaLen)), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
		switch e {
		case 0:
		case unix.EAGAIN:
			ln.pending = false
			return
		case unix.EINTR, unix.ECONNABORTED:
			continue
		default:
			// Out of descriptors or memory: back off instead of spinning,
			// as net/http does; the clients wait in the backlog.
			ln.pending = true
			lp.backoff = min(max(2*lp.backoff, 5*time.Millisecond), time.Second)
			lp.l.metrics.errAccept.Inc()
			lp.l.log.Warn("accept failed; backing off", "err", os.NewSyscallError("accept4", e), "backoff", lp.backoff.String())
			lp.acceptRetry = time.Now().Add(lp.backoff).UnixNano()
			lp.arm(lp.acceptRetry)
			return
		}
		lp.backoff = 0
		lp.l.metrics.accepted.Inc()
		lp.open(ln, int(fd), sockaddrAddrPort(&lp.rsa))
	}
}

// open starts relaying an accepted client connection.
func (lp *loop) open(ln *loopListener, fd int, src netip.AddrPort) {
	var c *conn
	if n := len(lp.free); n > 0 {
		c, lp.free = lp.free[n-1], lp.free[:n-1]
	} else {
		c = &conn{}
	}
	c.client = sock{fd: fd, kind: kindClient, c: c}
	c.backend = sock{fd: -1, kind: kindBackend, c: c}
	c.up = dir{src: &c.client, dst: &c.backend}
	c.down = dir{src: &c.backend, dst: &c.client}
	c.ln, c.src, c.dst = ln, src, ln.local
	c.state = stateConnecting
	if err := lp.register(&c.client); err != nil {
		lp.l.log.Warn("cannot poll a client connection", "err", err)
		lp.closeSock(&c.client)
		c.state = stateFree
		lp.free = append(lp.free, c)
		return
	}
	lp.nconns++
	lp.l.open.Add(1)
	if c.dst.Addr().IsUnspecified() {
		lp.rsaLen = unix.SizeofSockaddrAny
		if _, _, e := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&lp.rsa)), uintptr(unsafe.Pointer(&lp.rsaLen))); e == 0 {
			c.dst = sockaddrAddrPort(&lp.rsa)
		}
	}
	lp.dial(c)
}

// dial connects c to a backend chosen by the pool, trying up to three
// different backends when a connect fails.
func (lp *loop) dial(c *conn) {
	lp.ip = c.src.Addr().As16()
	for c.attempts < len(c.tried) {
		b := c.ln.pool.Pick(net.IP(lp.ip[:]), c.tried[:c.attempts])
		if b == nil {
			break
		}
		c.tried[c.attempts] = b
		c.attempts++
		dst := b.dst.Load()
		if dst == nil {
			continue // a host name the health checker has not resolved yet
		}
		fd, err := lp.connect(*dst)
		if err != nil {
			lp.l.metrics.errConnect.Inc()
			if !errors.Is(err, unix.EMFILE) && !errors.Is(err, unix.ENFILE) && !errors.Is(err, unix.ENOBUFS) && !errors.Is(err, unix.ENOMEM) {
				lp.l.passiveFailure(b, err)
			}
			continue
		}
		c.b = b
		c.backend = sock{fd: fd, kind: kindBackend, c: c}
		if err := lp.register(&c.backend); err != nil {
			lp.closeSock(&c.backend)
			break
		}
		c.deadline = time.Now().Add(lp.l.cfg.ConnectTimeout).UnixNano()
		lp.connects.push(timed{c: c, gen: c.client.gen, at: c.deadline})
		lp.arm(c.deadline)
		return
	}
	lp.l.metrics.errNoBackend.Inc()
	lp.close(c)
}

// connect opens a non-blocking socket and starts connecting it to dst. On
// loopback or a LAN the handshake completes inside connect(2).
func (lp *loop) connect(dst netip.AddrPort) (int, error) {
	a := dst.Addr().Unmap()
	family := unix.AF_INET6
	if a.Is4() {
		family = unix.AF_INET
	}
	fd, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, os.NewSyscallError("socket", e)
	}
	one := int32(1)
	_, _, _ = unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, uintptr(unsafe.Pointer(&one)), 4, 0)
	port := dst.Port()
	port = port>>8 | port<<8 // network byte order
	if a.Is4() {
		sa := unix.RawSockaddrInet4{Family: unix.AF_INET, Port: port, Addr: a.As4()}
		_, _, e = unix.RawSyscall(unix.SYS_CONNECT, fd, uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	} else {
		sa := unix.RawSockaddrInet6{Family: unix.AF_INET6, Port: port, Addr: a.As16()}
		_, _, e = unix.RawSyscall(unix.SYS_CONNECT, fd, uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	}
	if e != 0 && e != unix.EINPROGRESS {
		_, _, _ = unix.RawSyscall(unix.SYS_CLOSE, fd, 0, 0)
		return -1, os.NewSyscallError("connect", e)
	}
	return int(fd), nil
}

// connectFailed gives up on c's backend and tries the next one.
func (lp *loop) connectFailed(c *conn, err error) {
	lp.closeSock(&c.backend)
	lp.l.metrics.errConnect.Inc()
	lp.l.passiveFailure(c.b, os.NewSyscallError("connect", err))
	c.b = nil
	lp.dial(c)
}

// progress moves c on after an event on one of its sockets.
func (lp *loop) progress(c *conn) {
	if c.state == stateConnecting {
		if !c.backend.writable {
			return
		}
		soerr := int32(0)
		size := uint32(4)
		_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(c.backend.fd), unix.SOL_SOCKET, unix.SO_ERROR, uintptr(unsafe.Pointer(&soerr)), uintptr(unsafe.Pointer(&size)), 0)
		if e == 0 && soerr != 0 {
			e = syscall.Errno(soerr)
		}
		if e != 0 {
			lp.connectFailed(c, e)
			return
		}
		lp.connected(c)
		if c.state != stateRelaying {
			return
		}
	}
	if !lp.flush(c) || !lp.pump(&c.up, &c.down, len(c.pending) == 0) || !lp.pump(&c.down, &c.up, true) {
		lp.close(c)
		return
	}
	if c.up.ended && c.down.ended {
		lp.close(c)
	}
}

// connected starts relaying once the backend connection is up: the PROXY
// header goes out in one write together with whatever the client has
// already sent (a TLS ClientHello usually has arrived by now), so the
// backend reads both at once. It never waits for the client: protocols
// where the server speaks first still get their header at once.
func (lp *loop) connected(c *conn) {
	b := c.b
	b.connected()
	b.active.Add(1)
	b.total.Add(1)
	lp.l.metrics.active.Inc()
	c.state = stateRelaying
	at := time.Now().Add(lp.l.cfg.KeepaliveAfter).UnixNano()
	lp.keepalives.push(timed{c: c, gen: c.client.gen, at: at})
	lp.arm(at)
	if lp.l.cfg.ProxyProtocol == "off" {
		return
	}
	version := 2
	if lp.l.cfg.ProxyProtocol == "v1" {
		version = 1
	}
	buf := proxyproto.AppendProxy(lp.buf[:0], version, c.src, c.dst)
	hlen := len(buf)
	if c.client.readable {
		free := buf[hlen:cap(buf)]
		n, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(c.client.fd), uintptr(unsafe.Pointer(&free[0])), uintptr(len(free)), unix.MSG_DONTWAIT, 0, 0)
		switch e {
		case 0:
			buf = buf[:hlen+int(n)] // n == 0 is EOF: the relay sees it next
			// A short read emptied the receive queue: more data will be
			// reported as a new edge. Only an EOF already reported would
			// not be, so it keeps the socket readable.
			if int(n) > 0 && int(n) < len(free) && !c.client.hup {
				c.client.readable = false
			}
		case unix.EAGAIN:
			c.client.readable = false
		default:
			lp.l.metrics.errProxyHeader.Inc()
			lp.close(c)
			return
		}
	}
	c.up.n += int64(len(buf) - hlen)
	n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(c.backend.fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
	switch e {
	case 0:
	case unix.EAGAIN:
		n = 0
		c.backend.writable = false
	default:
		lp.l.metrics.errProxyHeader.Inc()
		lp.close(c)
		return
	}
	if int(n) < len(buf) {
		c.pending = append(c.pending[:0], buf[n:]...)
	}
}

// flush writes what is left of the first write.
func (lp *loop) flush(c *conn) bool {
	for len(c.pending) > 0 && c.backend.writable {
		n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(c.backend.fd), uintptr(unsafe.Pointer(&c.pending[0])), uintptr(len(c.pending)))
		switch e {
		case 0:
			c.pending = c.pending[n:]
		case unix.EAGAIN:
			c.backend.writable = false
		case unix.EINTR:
		default:
			return false
		}
	}
	return true
}

// pump moves d's bytes while both ends are ready, reporting false when the
// connection has failed. At src's EOF it half-closes dst (shutdown
// SHUT_WR) so the other direction keeps flowing: a client that sends its
// request and shuts down its side still gets the whole answer. A pipe is
// held only while bytes flow, so idle connections hold none.
func (lp *loop) pump(d, other *dir, mayRead bool) bool {
	for {
		if d.inPipe > 0 {
			if !d.dst.writable {
				return true
			}
			n, e := rawSplice(d.p.r, d.dst.fd, d.inPipe)
			switch e {
			case 0:
				d.inPipe -= n
				d.n += int64(n)
			case unix.EAGAIN:
				d.dst.writable = false
				return true
			case unix.EINTR:
			default:
				return false
			}
			continue
		}
		if d.ended || !d.src.readable || !mayRead {
			return true
		}
		if d.p == nil {
			p, err := lp.getPipe()
			if err != nil {
				lp.l.log.Warn("cannot relay: no pipe", "err", err)
				return false
			}
			d.p = p
		}
		n, e := rawSplice(d.src.fd, d.p.w, d.p.size)
		switch e {
		case 0:
		case unix.EAGAIN:
			d.src.readable = false
			lp.putPipe(d.p, true)
			d.p = nil
			return true
		case unix.EINTR:
			continue
		default:
			return false
		}
		if n == 0 {
			d.ended = true
			lp.putPipe(d.p, true)
			d.p = nil
			if !other.ended {
				_, _, _ = unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(d.dst.fd), unix.SHUT_WR, 0)
			}
			return true
		}
		d.inPipe = n
	}
}

// close ends c: both sockets closed, pipes given back, counters updated,
// and the struct kept for the next connection.
func (lp *loop) close(c *conn) {
	if c.state == stateFree {
		return
	}
	if c.state == stateRelaying {
		c.b.active.Add(-1)
		lp.l.metrics.active.Dec()
		lp.l.metrics.bytesIn.Add(float64(c.up.n))
		lp.l.metrics.bytesOut.Add(float64(c.down.n))
	}
	for _, d := range []*dir{&c.up, &c.down} {
		if d.p != nil {
			lp.putPipe(d.p, d.inPipe == 0)
		}
	}
	lp.closeSock(&c.client)
	lp.closeSock(&c.backend)
	lp.nconns--
	lp.l.open.Add(-1)
	*c = conn{pending: c.pending[:0]}
	if len(lp.free) < maxFreeConns {
		lp.free = append(lp.free, c)
	}
	if lp.stopping && lp.nconns == 0 {
		lp.quit = true
	}
}

func (lp *loop) getPipe() (*pipe, error) {
	if n := len(lp.pipes); n > 0 {
		p := lp.pipes[n-1]
		lp.pipes = lp.pipes[:n-1]
		return p, nil
	}
	return newPipe()
}

// putPipe keeps an empty pipe for reuse; one that may hold data is closed.
func (lp *loop) putPipe(p *pipe, empty bool) {
	if empty && len(lp.pipes) < maxFreePipes {
		lp.pipes = append(lp.pipes, p)
		return
	}
	p.close()
}

// sockaddrAddrPort converts an accepted peer or local address (IPv4-mapped
// IPv6 addresses become IPv4).
func sockaddrAddrPort(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(p[0])<<8|uint16(p[1]))
	}
	return netip.AddrPort{}
}
