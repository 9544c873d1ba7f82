package lb

import (
	"errors"
	"net"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The relay moves bytes with splice(2): socket → pipe → socket, so payload
// bytes are never copied into user memory. It calls splice directly, as a
// raw non-blocking system call, and waits for readiness through the
// connection's poller (syscall.RawConn): unlike io.Copy's splice path this
// skips the runtime's blocking-syscall bookkeeping on every call, which on
// a balancer is most of its calls (see docs/adr/0100).

// pipeSize is the pipe capacity asked for: larger pipes move more per call
// on bulk transfers (the kernel may grant less).
const pipeSize = 1 << 20

type pipe struct {
	r, w int
	size int
}

// pipes is a free list of pipes, so a connection does not cost a pipe2 and
// an fcntl; at most cap(pipes) idle pipes are kept.
var pipes = make(chan *pipe, 512)

func getPipe() (*pipe, error) {
	select {
	case p := <-pipes:
		return p, nil
	default:
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, err
	}
	p := &pipe{r: fds[0], w: fds[1], size: 64 << 10}
	if n, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, pipeSize); err == nil {
		p.size = n
	}
	return p, nil
}

// putPipe returns an empty pipe to the free list; a pipe that may still
// hold data is closed instead.
func putPipe(p *pipe, empty bool) {
	if empty {
		select {
		case pipes <- p:
			return
		default:
		}
	}
	_ = unix.Close(p.r)
	_ = unix.Close(p.w)
}

func rawSplice(in, out, n int) (int, syscall.Errno) {
	r, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	return int(r), e
}

// spliceCopy copies src to dst until src's EOF (nil error) or a failure.
func spliceCopy(dst, src *net.TCPConn) (int64, error) {
	rsrc, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	rdst, err := dst.SyscallConn()
	if err != nil {
		return 0, err
	}
	p, err := getPipe()
	if err != nil {
		return 0, err
	}
	var total int64
	inPipe := 0
	defer func() { putPipe(p, inPipe == 0) }()
	for {
		n, err := pollIO(rsrc, false, func(fd uintptr) (int, syscall.Errno) { return rawSplice(int(fd), p.w, p.size) })
		switch {
		case err != nil:
			return total, err
		case n == 0:
			return total, nil
		}
		inPipe = n
		for inPipe > 0 {
			n, err := pollIO(rdst, true, func(fd uintptr) (int, syscall.Errno) { return rawSplice(p.r, int(fd), inPipe) })
			switch {
			case err != nil:
				return total, err
			case n == 0:
				return total, errors.New("splice to socket wrote nothing")
			}
			inPipe -= n
			total += int64(n)
		}
	}
}

// rawWrite writes b to c with raw non-blocking write(2) calls, waiting for
// writability through the poller like spliceCopy: the PROXY header is the
// only write the relay makes, and it should not pay for the runtime's
// blocking-syscall path (which wakes sysmon when the process was idle).
func rawWrite(c *net.TCPConn, b []byte) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	for len(b) > 0 {
		n, err := pollIO(rc, true, func(fd uintptr) (int, syscall.Errno) {
			r, _, e := unix.RawSyscall(unix.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
			return int(r), e
		})
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// pollIO runs a raw non-blocking system call on rc's descriptor through
// the poller: retried on EINTR, and on EAGAIN run again once the
// descriptor is readable (or writable, with write).
func pollIO(rc syscall.RawConn, write bool, call func(fd uintptr) (int, syscall.Errno)) (int, error) {
	var n int
	var errno syscall.Errno
	f := func(fd uintptr) bool {
		for {
			n, errno = call(fd)
			if errno != unix.EINTR {
				return errno != unix.EAGAIN
			}
		}
	}
	var err error
	if write {
		err = rc.Write(f)
	} else {
		err = rc.Read(f)
	}
	if err != nil {
		return n, err
	}
	if errno != 0 {
		return n, errno
	}
	return n, nil
}

// rawCloseWrite shuts down c's sending side (shutdown(2) SHUT_WR) with a
// raw system call; see rawWrite.
func rawCloseWrite(c *net.TCPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.RawSyscall(unix.SYS_SHUTDOWN, fd, unix.SHUT_WR, 0)
	}); err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}

// firstChunk bounds the client bytes sent along with the PROXY header.
const firstChunk = 16 << 10

var chunkBufs = sync.Pool{New: func() any { b := make([]byte, 0, 256+firstChunk); return &b }}

// sendHeader writes the PROXY header to upstream together with whatever
// the client has already sent (a TLS ClientHello usually has arrived by
// the time the backend connection is up): one write and one TCP segment
// instead of a write and a splice through the pipe, and the backend reads
// both at once. It never waits for the client — protocols where the
// server speaks first still get their header at once. It returns the
// number of client bytes sent.
func sendHeader(upstream, client *net.TCPConn, header []byte) (int64, error) {
	bp := chunkBufs.Get().(*[]byte)
	defer chunkBufs.Put(bp)
	buf := append((*bp)[:0], header...)
	n, err := readQueued(client, buf[len(buf):cap(buf)])
	if err != nil {
		return 0, err
	}
	if err := rawWrite(upstream, buf[:len(buf)+n]); err != nil {
		return 0, err
	}
	return int64(n), nil
}

// readQueued reads what is already queued on c into b without waiting (0
// when nothing is, or at EOF: the relay sees the EOF next).
func readQueued(c *net.TCPConn, b []byte) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		for {
			r, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), unix.MSG_DONTWAIT, 0, 0)
			n, errno = int(r), e
			if e != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return 0, err
	}
	switch errno {
	case 0:
		return n, nil
	case unix.EAGAIN:
		return 0, nil
	default:
		return 0, errno
	}
}
