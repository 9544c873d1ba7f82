package edge

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// sysPair returns a connected loopback pair whose first end is a sysConn.
func sysPair(t *testing.T) (net.Conn, net.Conn) {
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
	c, err := sysListener{ln}.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*sysConn); !ok {
		t.Fatalf("accepted %T, want *sysConn", c)
	}
	t.Cleanup(func() { c.Close(); peer.Close() })
	return c, peer
}

// TestSysConn: reads, writes larger than the socket buffers, EOF,
// deadlines and Close behave as on a net.TCPConn.
func TestSysConn(t *testing.T) {
	c, peer := sysPair(t)
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
	if _, err := peer.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("read: %q %v", buf[:n], err)
	}
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	var ne net.Error
	if _, err := c.Read(buf); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past the deadline: %v", err)
	}
	_ = c.SetReadDeadline(time.Time{})
	peer.(*net.TCPConn).CloseWrite()
	if n, err := c.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read at the peer's FIN: %d %v", n, err)
	}

	c2, _ := sysPair(t)
	done := make(chan error, 1)
	go func() { _, err := c2.Read(buf); done <- err }()
	time.Sleep(20 * time.Millisecond)
	c2.Close()
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
}
