package lb

import (
	"context"
	"net"
	"net/netip"
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
// on them by LB.runKeepalive once they have been open for a while, never
// on a connection's path (four system calls that would add to every new
// connection's cost).
func newDialer(timeout time.Duration) *net.Dialer {
	return &net.Dialer{Timeout: timeout, KeepAlive: -1, ControlContext: rawConnect}
}

// rawConnect starts the connect(2) itself, as a raw system call. On
// loopback or a LAN the handshake runs inside the call (tens of µs here);
// through the runtime's blocking-syscall path that is long enough for
// sysmon to take the P away and wake another thread, and for the caller
// to queue for it again (context switches on the connection's path). The
// dialer's own connect then finds it in progress (EALREADY) or done
// (EISCONN) and waits for writability as usual.
func rawConnect(_ context.Context, network, address string, c syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil // leave it to the dialer
	}
	var serr error
	port := ap.Port()
	port = port>>8 | port<<8 // network byte order
	err = c.Control(func(fd uintptr) {
		var errno syscall.Errno
		if a := ap.Addr().Unmap(); a.Is4() {
			sa := unix.RawSockaddrInet4{Family: unix.AF_INET, Port: port, Addr: a.As4()}
			_, _, errno = unix.RawSyscall(unix.SYS_CONNECT, fd, uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
		} else {
			sa := unix.RawSockaddrInet6{Family: unix.AF_INET6, Port: port, Addr: a.As16(), Scope_id: 0}
			_, _, errno = unix.RawSyscall(unix.SYS_CONNECT, fd, uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
		}
		if errno != 0 && errno != unix.EINPROGRESS {
			serr = os.NewSyscallError("connect", errno)
		}
	})
	if err != nil {
		return err
	}
	return serr
}
