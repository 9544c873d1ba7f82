package fifopoll

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// recvNow reads what c has received without waiting.
func recvNow(t *testing.T, c net.Conn, buf []byte) int {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	_ = rc.Read(func(fd uintptr) bool {
		r, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafePointer(buf)), uintptr(len(buf)), syscall.MSG_DONTWAIT, 0, 0)
		if e == 0 {
			n = int(r)
		}
		return true
	})
	return n
}

// TestBatchWrites: writes made in one scheduling round go out together
// when it ends — none before — in order, and Close writes what is
// pending before closing.
func TestBatchWrites(t *testing.T) {
	c, peer := pair(t)
	c.BatchWrites()
	for i := range 10 {
		if n, err := c.Write([]byte{'a' + byte(i)}); n != 1 || err != nil {
			t.Fatalf("write: %d %v", n, err)
		}
	}
	buf := make([]byte, 64)
	if n := recvNow(t, peer, buf); n != 0 {
		t.Fatalf("%q arrived before the round ended", buf[:n])
	}
	_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := peer.Read(buf); err != nil || string(buf[:n]) != "abcdefghij" {
		t.Fatalf("after the round: %q %v, want all ten writes at once", buf[:n], err)
	}

	// Many writes of many sizes while the peer reads: every byte, in order.
	want := make([]byte, 8<<20)
	_, _ = rand.Read(want)
	got := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(io.LimitReader(peer, int64(len(want)))); got <- b }()
	for off, size := 0, 1; off < len(want); size = size*7%70001 + 1 {
		end := min(off+size, len(want))
		if _, err := c.Write(want[off:end]); err != nil {
			t.Fatal(err)
		}
		off = end
	}
	if b := <-got; !bytes.Equal(b, want) {
		t.Fatalf("peer got %d bytes, not what was written", len(b))
	}

	// Close writes what is pending.
	if _, err := c.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(peer); err != nil || string(b) != "last words" {
		t.Fatalf("after Close: %q %v", b, err)
	}
}

// TestBatchBackpressure: with a peer that does not read, writers wait
// once 64 KiB are pending, and the write deadline ends the wait; a reset
// by the peer fails the writes after it.
func TestBatchBackpressure(t *testing.T) {
	c, _ := pair(t)
	c.BatchWrites()
	_ = c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
	chunk := make([]byte, 16<<10)
	var err error
	for total := 0; err == nil && total < 256<<20; total += len(chunk) {
		_, err = c.Write(chunk)
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("writing to a peer that does not read: %v", err)
	}

	c2, peer2 := pair(t)
	c2.BatchWrites()
	_ = peer2.(*net.TCPConn).SetLinger(0)
	_, _ = c2.Write([]byte("x"))
	time.Sleep(10 * time.Millisecond)
	peer2.Close()
	time.Sleep(10 * time.Millisecond)
	_ = c2.SetWriteDeadline(time.Now().Add(5 * time.Second))
	for i := 0; ; i++ {
		if _, err := c2.Write([]byte("after the reset")); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("write after a reset timed out instead of failing")
			}
			break
		}
		if i > 1000 {
			t.Fatal("writes after the peer's reset keep succeeding")
		}
		time.Sleep(time.Millisecond)
	}
}

func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }
