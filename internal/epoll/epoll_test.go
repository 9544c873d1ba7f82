package epoll

import (
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestWaitInRuntimePoller: a goroutine parked in RC.Read wakes when the
// instance gets an event, Wait takes it, and the file's read deadline
// ends a wait with nothing ready.
func TestWaitInRuntimePoller(t *testing.T) {
	in, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer in.File.Close()
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if err := unix.EpollCtl(in.FD, unix.EPOLL_CTL_ADD, efd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(efd)}); err != nil {
		t.Fatal(err)
	}
	events := make([]unix.EpollEvent, 8)
	wait := func() (int, error) {
		got := 0
		err := in.RC.Read(func(uintptr) bool {
			n, err := in.Wait(events)
			got = n
			return err != nil || n > 0
		})
		return got, err
	}

	_ = in.File.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, err := wait(); n != 0 || !os.IsTimeout(err) {
		t.Fatalf("nothing ready: %d events, %v", n, err)
	}
	_ = in.File.SetReadDeadline(time.Time{})

	go func() {
		time.Sleep(20 * time.Millisecond)
		one := uint64(1)
		_, _ = unix.Write(efd, (*[8]byte)(unsafe.Pointer(&one))[:])
	}()
	n, err := wait()
	if err != nil || n != 1 || events[0].Fd != int32(efd) || events[0].Events&unix.EPOLLIN == 0 {
		t.Fatalf("after the event: %d events (%+v), %v", n, events[0], err)
	}
}
