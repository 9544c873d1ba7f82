package lb

import (
	"context"
	"net"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Keepalive settings for both sides of every relayed connection: a peer
// that vanished without a FIN or RST (power loss, a dropped NAT entry) is
// detected after keepaliveIdle + keepaliveCount × keepaliveInterval.
const (
	keepaliveIdle     = 30 * time.Second
	keepaliveInterval = 10 * time.Second
	keepaliveCount    = 6
)

// setKeepalive enables TCP keepalive on a raw socket. The options are set
// with raw system calls: they are fast, and the runtime's blocking-syscall
// path would wake sysmon when the process was idle.
func setKeepalive(fd int) error {
	for _, o := range []struct{ level, opt, val int }{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(keepaliveIdle / time.Second)},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, int(keepaliveInterval / time.Second)},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepaliveCount},
	} {
		v := int32(o.val)
		_, _, errno := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(o.level), uintptr(o.opt), uintptr(unsafe.Pointer(&v)), 4, 0)
		if errno != 0 {
			return os.NewSyscallError("setsockopt", errno)
		}
	}
	return nil
}

func controlKeepalive(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) { serr = setKeepalive(int(fd)) }); err != nil {
		return err
	}
	return serr
}

// keepalive enables TCP keepalive on an open connection.
func keepalive(c *net.TCPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	return controlKeepalive("", "", rc)
}

// listen binds a public listener. Keepalive is set once on the listening
// socket: Linux copies it (and TCP_NODELAY) to every accepted socket, which
// saves four setsockopt calls per connection over setting it on each.
func listen(ctx context.Context, addr string) (*net.TCPListener, error) {
	lc := net.ListenConfig{KeepAlive: -1, Control: controlKeepalive}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// newDialer returns the dialer for backend connections. Keepalive is set
// on them by relay once the first bytes have come back from the backend,
// off the path of the first request (four system calls that would add to
// every new connection's latency).
func newDialer(timeout time.Duration) *net.Dialer {
	return &net.Dialer{Timeout: timeout, KeepAlive: -1}
}
