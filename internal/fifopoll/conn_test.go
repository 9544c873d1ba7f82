package fifopoll

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// One P, so the wake-up order test sees the scheduler's order; the
// package's pollers are made at first use, one per P.
func TestMain(m *testing.M) {
	runtime.GOMAXPROCS(1)
	os.Exit(m.Run())
}

// pair returns a connected loopback pair whose first end is a Conn.
func pair(t *testing.T) (*Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c, err := Adopt(tc.(*net.TCPConn))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); peer.Close() })
	return c, peer
}

// TestConn: reads, writes larger than the socket buffers, EOF, deadlines
// (also moved while a read waits), Close from another goroutine and
// CloseWrite behave as on a *net.TCPConn.
func TestConn(t *testing.T) {
	c, peer := pair(t)
	if c.RemoteAddr().String() != peer.LocalAddr().String() || c.LocalAddr().String() != peer.RemoteAddr().String() {
		t.Fatalf("addresses %v %v, peer's %v %v", c.LocalAddr(), c.RemoteAddr(), peer.LocalAddr(), peer.RemoteAddr())
	}
	big := make([]byte, 8<<20)
	_, _ = rand.Read(big)
	got := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(io.LimitReader(peer, int64(len(big)))); got <- b }()
	if n, err := c.Write(big); n != len(big) || err != nil {
		t.Fatalf("write: %d %v", n, err)
	}
	if b := <-got; !bytes.Equal(b, big) {
		t.Fatalf("peer got %d bytes, not what was written", len(b))
	}
	go func() { _, _ = peer.Write(big) }()
	if b, err := io.ReadAll(io.LimitReader(c, int64(len(big)))); err != nil || !bytes.Equal(b, big) {
		t.Fatalf("read %d bytes (%v), not what the peer wrote", len(b), err)
	}

	buf := make([]byte, 16)
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	var ne net.Error
	if _, err := c.Read(buf); !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v", err)
	}
	if d := time.Since(start); d < 40*time.Millisecond || d > 2*time.Second {
		t.Fatalf("deadline of 50ms ended the read after %v", d)
	}
	// A deadline moved into the past while a read waits ends it; one
	// cleared lets the next read wait for data.
	_ = c.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() { _, err := c.Read(buf); done <- err }()
	time.Sleep(20 * time.Millisecond)
	_ = c.SetReadDeadline(time.Unix(1, 0))
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read when the deadline moved to the past: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a deadline set in the past did not end a waiting read")
	}
	_ = c.SetReadDeadline(time.Time{})
	go func() { time.Sleep(20 * time.Millisecond); _, _ = peer.Write([]byte("hello")) }()
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("read: %q %v", buf[:n], err)
	}

	_ = peer.(*net.TCPConn).CloseWrite()
	if n, err := c.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read at the peer's FIN: %d %v", n, err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := peer.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("peer read after CloseWrite: %d %v", n, err)
	}

	c2, _ := pair(t)
	go func() { _, err := c2.Read(buf); done <- err }()
	time.Sleep(20 * time.Millisecond)
	if err := c2.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read on a closed conn: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end a blocked Read")
	}
	if _, err := c2.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write on a closed conn: %v", err)
	}
	if err := c2.Close(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}

	// A write blocked on a full socket ends at its deadline.
	c3, _ := pair(t)
	huge := make([]byte, 64<<20)
	_ = c3.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c3.Write(huge); !errors.Is(err, os.ErrDeadlineExceeded) || n == 0 || n == len(huge) {
		t.Fatalf("write to a peer that does not read: %d %v", n, err)
	}
}

// TestLastBytesAndFIN: data and the peer's FIN that arrive together (one
// readiness edge) give the data, then EOF — not a wait for an edge that
// never comes.
func TestLastBytesAndFIN(t *testing.T) {
	c, peer := pair(t)
	_, _ = peer.Write([]byte("bye"))
	peer.Close()
	time.Sleep(20 * time.Millisecond)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "bye" {
		t.Fatalf("read: %q %v", buf[:n], err)
	}
	if n, err := c.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read after the last bytes: %d %v, want EOF", n, err)
	}
}

// TestPeerReset: a reset by the peer is an error, not EOF or a hang.
func TestPeerReset(t *testing.T) {
	c, peer := pair(t)
	_ = peer.(*net.TCPConn).SetLinger(0)
	_, _ = c.Write([]byte("unread")) // so the close sends RST
	time.Sleep(10 * time.Millisecond)
	peer.Close()
	buf := make([]byte, 16)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(buf); err == nil || err == io.EOF || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read after the peer's reset: %v", err)
	}
}

// TestConcurrent: concurrent reads and writes on one Conn (which net.Conn
// allows) lose no byte, and a read or a write allocates nothing.
func TestConcurrent(t *testing.T) {
	c, peer := pair(t)
	const workers, chunks, size = 4, 200, 1000
	go func() { _, _ = io.Copy(peer, peer) }() // echo
	var got atomic.Int64
	var readers sync.WaitGroup
	for range workers {
		readers.Go(func() {
			buf := make([]byte, 4096)
			for {
				n, err := c.Read(buf)
				got.Add(int64(n))
				if err != nil {
					return
				}
			}
		})
	}
	var writers sync.WaitGroup
	for range workers {
		writers.Go(func() {
			p := bytes.Repeat([]byte{'z'}, size)
			for range chunks {
				if _, err := c.Write(p); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	writers.Wait()
	for start := time.Now(); got.Load() < workers*chunks*size; time.Sleep(time.Millisecond) {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("echoed %d of %d bytes", got.Load(), workers*chunks*size)
		}
	}
	_ = c.SetReadDeadline(time.Now())
	readers.Wait()
	if got.Load() != workers*chunks*size {
		t.Fatalf("echoed %d bytes, want %d", got.Load(), workers*chunks*size)
	}

	c2, peer2 := pair(t)
	buf := make([]byte, 64)
	msg := []byte("ping")
	allocs := testing.AllocsPerRun(200, func() {
		_ = c2.SetReadDeadline(time.Now().Add(time.Minute))
		if _, err := c2.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(peer2, buf[:len(msg)]); err != nil {
			t.Fatal(err)
		}
		if _, err := peer2.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c2, buf[:len(msg)]); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per deadline + write + read, want 0", allocs)
	}
}

// TestManyReady: more connections ready at once than the poller takes
// before it yields (pollBatches × pollEvents) are all served.
func TestManyReady(t *testing.T) {
	const n = pollBatches*pollEvents + 100
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conns := make([]*Conn, n)
	peers := make([]net.Conn, n)
	for i := range n {
		if peers[i], err = net.Dial("tcp", ln.Addr().String()); err != nil {
			t.Fatal(err)
		}
		defer peers[i].Close()
		tc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if conns[i], err = Adopt(tc.(*net.TCPConn)); err != nil {
			t.Fatal(err)
		}
		defer conns[i].Close()
	}
	var served atomic.Int32
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			buf := make([]byte, 1)
			if _, err := c.Read(buf); err == nil {
				served.Add(1)
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	for _, p := range peers {
		if _, err := p.Write([]byte{1}); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	if served.Load() != n {
		t.Fatalf("%d of %d readers served", served.Load(), n)
	}
}
