package vmm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// PIDFile is the name of the file in a machine's state directory that
// holds its VMM process id.
const PIDFile = "vmm.pid"

// WritePID records pid in dir.
func WritePID(dir string, pid int) error {
	return os.WriteFile(filepath.Join(dir, PIDFile), []byte(strconv.Itoa(pid)), 0o644)
}

// FindProcess returns the pid recorded in dir when that process still runs
// and its command line contains marker (a pid may have been reused by an
// unrelated process); ErrGone otherwise.
func FindProcess(dir, marker string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dir, PIDFile))
	if err != nil {
		return 0, ErrGone
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, ErrGone
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), marker) {
		return 0, ErrGone
	}
	return pid, nil
}

// Watch returns a channel closed when pid — a process this one did not
// start, so it cannot wait for it — has exited, after running onExit
// (which may be nil). It watches through a pidfd; ErrGone when the
// process is already gone.
func Watch(pid int, onExit func()) (<-chan struct{}, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, ErrGone
	}
	done := make(chan struct{})
	go func() { // ends when the process exits
		defer unix.Close(fd)
		for {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if _, err := unix.Poll(fds, -1); err == unix.EINTR {
				continue
			}
			if onExit != nil {
				onExit()
			}
			close(done)
			return
		}
	}()
	return done, nil
}

// Kill sends SIGKILL to pid unless done is already closed, and waits up to
// 10 s for done. name names the VMM in the error.
func Kill(pid int, done <-chan struct{}, name string) error {
	select {
	case <-done:
		return nil
	default:
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	select {
	case <-done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s did not exit after SIGKILL", name)
	}
}
