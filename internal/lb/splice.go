package lb

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// The relay moves bytes with splice(2): socket → pipe → socket, so payload
// bytes are never copied into user memory.

// pipeSize is the pipe capacity asked for: larger pipes move more per call
// on bulk transfers (the kernel may grant less).
const pipeSize = 1 << 20

// firstChunk bounds the client bytes sent along with the PROXY header.
const firstChunk = 16 << 10

type pipe struct {
	r, w int
	size int
}

func newPipe() (*pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, os.NewSyscallError("pipe2", err)
	}
	p := &pipe{r: fds[0], w: fds[1], size: 64 << 10}
	if n, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, pipeSize); err == nil {
		p.size = n
	}
	return p, nil
}

func (p *pipe) close() {
	_, _, _ = unix.RawSyscall(unix.SYS_CLOSE, uintptr(p.r), 0, 0)
	_, _, _ = unix.RawSyscall(unix.SYS_CLOSE, uintptr(p.w), 0, 0)
}

// rawSplice moves up to n bytes from in to out without blocking.
func rawSplice(in, out, n int) (int, syscall.Errno) {
	r, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	return int(r), e
}
