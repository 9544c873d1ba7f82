// Package epoll opens epoll instances whose readiness the runtime's poller
// waits for: the goroutine serving one parks in RawConn.Read (deadlines
// are the file's) until the instance has events, then takes them with
// non-blocking epoll_pwait calls. The load balancer's relay loops
// (internal/lb) and the edge's pollers (internal/fifopoll) are built on it.
package epoll

import (
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Instance is one epoll instance.
type Instance struct {
	FD   int
	File *os.File // FD, registered with the runtime's poller; Close closes the instance
	RC   syscall.RawConn
}

// Open creates an instance.
func Open() (*Instance, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	in := &Instance{FD: fd, File: os.NewFile(uintptr(fd), "epoll")}
	if in.RC, err = in.File.SyscallConn(); err != nil {
		_ = in.File.Close()
		return nil, err
	}
	return in, nil
}

// Wait takes the ready events into events without waiting (a raw
// epoll_pwait, retried on EINTR) and returns how many it took.
func (in *Instance) Wait(events []unix.EpollEvent) (int, error) {
	for {
		n, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(in.FD), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
		switch e {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		}
		return 0, os.NewSyscallError("epoll_pwait", e)
	}
}
