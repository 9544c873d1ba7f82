package lb

import (
	"context"
	"errors"
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

// listen binds a public listener. Keepalive and TCP_NODELAY are set once
// on the listening socket: Linux copies them to every accepted socket,
// which saves five setsockopt calls per connection. reusePort lets every
// relay loop bind its own socket of the same address.
func listen(ctx context.Context, addr string, reusePort bool) (*net.TCPListener, error) {
	lc := net.ListenConfig{KeepAlive: -1, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = setKeepalive(int(fd))
			if serr == nil {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
			}
			if serr == nil && reusePort {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}
		})
		return errors.Join(err, serr)
	}}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}
