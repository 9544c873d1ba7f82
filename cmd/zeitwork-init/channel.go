package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/guest"
)

// openAgentChannel opens init's end of the agent channel, whichever the
// VMM offers: the virtio-serial port named guest.PortName (QEMU), or else,
// once the kernel has a vsock device (Firecracker), a vsock listener on
// guest.VsockPort whose every accepted connection becomes the channel's
// current one (each node agent start dials anew). It gives up when neither
// has appeared within timeout.
func openAgentChannel(timeout time.Duration) (*guest.Channel, error) {
	deadline := time.Now().Add(timeout)
	for {
		port, err := findPort()
		if err != nil {
			return nil, err
		}
		if port != nil {
			ch := guest.NewChannel()
			ch.Accept(virtioPort{f: port, retry: 200 * time.Millisecond})
			return ch, nil
		}
		if cid, ok := vsockCID(); ok {
			l, err := listenVsock(guest.VsockPort)
			if err != nil {
				return nil, err
			}
			logf("agent channel: vsock cid %d port %d", cid, guest.VsockPort)
			ch := guest.NewChannel()
			go acceptLoop(l, ch) // runs until power-off
			return ch, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("neither a virtio port named %s nor a vsock device", guest.PortName)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// findPort opens the virtio-serial port named guest.PortName; nil when
// there is none (yet).
func findPort() (*os.File, error) {
	names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err == nil && strings.TrimSpace(string(b)) == guest.PortName {
			return os.OpenFile("/dev/"+filepath.Base(filepath.Dir(n)), os.O_RDWR, 0)
		}
	}
	return nil, nil
}

// virtioPort is the virtio-serial port as the channel's one connection for
// the VM's life. While the host side is disconnected (a node agent
// restarting) reads return EOF at once and writes block; the next agent
// connects behind the same port, so Read waits for it instead of ending
// the connection, and Close keeps the port open.
type virtioPort struct {
	f     io.ReadWriter
	retry time.Duration
}

func (p virtioPort) Read(b []byte) (int, error) {
	for {
		n, err := p.f.Read(b)
		if n > 0 || err != io.EOF {
			return n, err
		}
		time.Sleep(p.retry)
	}
}

func (p virtioPort) Write(b []byte) (int, error) { return p.f.Write(b) }
func (p virtioPort) Close() error                { return nil }

// vsockCID is the guest's vsock context id, when a vsock transport with a
// device is up. Loading the vsock modules without a device (QEMU here: no
// vhost-vsock) leaves it VMADDR_CID_ANY.
func vsockCID() (uint32, bool) {
	f, err := os.Open("/dev/vsock")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	cid, err := unix.IoctlGetUint32(int(f.Fd()), unix.IOCTL_VM_SOCKETS_GET_LOCAL_CID)
	if err != nil || cid == unix.VMADDR_CID_ANY || cid <= unix.VMADDR_CID_HOST {
		return 0, false
	}
	return cid, true
}

// vsockListener is a vsock stream listener on the Go poller (Close ends a
// blocked Accept); accepted connections are pollable *os.File too, so the
// channel's Close of a replaced connection ends a read blocked on it.
type vsockListener struct {
	f      *os.File
	rc     syscall.RawConn
	closed atomic.Bool
}

func listenVsock(port uint32) (*vsockListener, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("vsock socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vsock bind port %d: %w", port, err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vsock listen: %w", err)
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("vsock:%d", port))
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &vsockListener{f: f, rc: rc}, nil
}

func (l *vsockListener) Accept() (io.ReadWriteCloser, error) {
	var nfd int
	var aerr error
	err := l.rc.Read(func(fd uintptr) bool {
		nfd, _, aerr = unix.Accept4(int(fd), unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		return aerr != unix.EAGAIN && aerr != unix.EINTR
	})
	if l.closed.Load() {
		if err == nil && aerr == nil {
			unix.Close(nfd)
		}
		return nil, os.ErrClosed // RawConn reports internal/poll's error
	}
	if err != nil {
		return nil, err
	}
	if aerr != nil {
		return nil, aerr
	}
	return os.NewFile(uintptr(nfd), "vsock-conn"), nil
}

func (l *vsockListener) Close() error {
	l.closed.Store(true)
	return l.f.Close()
}

type acceptor interface {
	Accept() (io.ReadWriteCloser, error)
}

// acceptLoop hands every connection l accepts to ch, the newest replacing
// the previous one. It returns when l is closed.
func acceptLoop(l acceptor, ch *guest.Channel) {
	for {
		c, err := l.Accept()
		if errors.Is(err, os.ErrClosed) {
			return
		}
		if err != nil {
			logf("agent channel: accept: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		ch.Accept(c)
	}
}
