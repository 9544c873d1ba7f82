package edge

import (
	"context"
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// sysConn is a TCP connection whose reads and writes are raw non-blocking
// system calls made through the runtime's poller (syscall.RawConn), so
// deadlines and Close work as for any net.Conn (docs/adr/0501).
//
// net.TCPConn's Read and Write go through the runtime's blocking-syscall
// path. A write to a loopback or LAN socket runs the receiver's TCP stack
// inside the call and often lasts longer than one sysmon tick (20 µs on
// these machines), and then sysmon takes the P away and hands it to
// another thread; when the call returns, its thread finds the P gone,
// queues the goroutine and sleeps. And while it keeps finding Ps to take,
// sysmon polls every 20 µs — on a pinned CPU, each poll is a context
// switch away from the requests. Raw calls never leave the P.
type sysConn struct {
	*net.TCPConn
	rc syscall.RawConn
}

// newSysConn wraps a TCP connection; anything else is returned as is.
func newSysConn(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	return &sysConn{TCPConn: tc, rc: rc}
}

func (c *sysConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var errno syscall.Errno
	err := c.rc.Read(func(fd uintptr) bool {
		n, errno = rawIO(syscall.SYS_READ, fd, p)
		return errno != syscall.EAGAIN
	})
	switch {
	case err != nil:
		return 0, err
	case errno != 0:
		return 0, c.opError("read", errno)
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

func (c *sysConn) Write(p []byte) (int, error) {
	written := 0
	for written < len(p) {
		var n int
		var errno syscall.Errno
		rest := p[written:]
		err := c.rc.Write(func(fd uintptr) bool {
			n, errno = rawIO(syscall.SYS_WRITE, fd, rest)
			return errno != syscall.EAGAIN
		})
		if err != nil {
			return written, err
		}
		if errno != 0 {
			return written, c.opError("write", errno)
		}
		written += n
	}
	return written, nil
}

// rawIO makes one read or write (trap) of p on fd, retried on EINTR.
func rawIO(trap, fd uintptr, p []byte) (int, syscall.Errno) {
	for {
		r, _, e := syscall.RawSyscall(trap, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		if e != syscall.EINTR {
			return int(r), e
		}
	}
}

func (c *sysConn) opError(op string, errno syscall.Errno) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError(op, errno)}
}

// sysListener hands out accepted TCP connections as sysConns.
type sysListener struct{ net.Listener }

func (l sysListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newSysConn(c), nil
}

// sysDial dials with d and wraps the connection as a sysConn.
func sysDial(d *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return newSysConn(c), nil
	}
}
