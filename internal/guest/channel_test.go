package guest

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// host is the agent's end of one connection.
type host struct {
	t    *testing.T
	conn net.Conn
	r    *Reader
	w    *Writer
}

func newHost(t *testing.T, c net.Conn) *host {
	t.Cleanup(func() { c.Close() })
	return &host{t: t, conn: c, r: NewReader(c), w: NewWriter(c)}
}

// expect reads the next frame, which must be of type typ (and, for a log
// frame, carry line).
func (h *host) expect(typ, line string) {
	h.t.Helper()
	h.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	f, err := h.r.Next()
	if err != nil {
		h.t.Fatalf("host: want %s %q, got error %v", typ, line, err)
	}
	if f.Type != typ || f.Line != line {
		h.t.Fatalf("host: want %s %q, got %s %q", typ, line, f.Type, f.Line)
	}
}

func (h *host) send(f *Frame) {
	h.t.Helper()
	if err := h.w.Send(f); err != nil {
		h.t.Fatal(err)
	}
}

// socketpair stands in for an accepted vsock connection: one end for the
// channel (an *os.File, as init's accepted vsock sockets are), one for the
// host.
func socketpair(t *testing.T) (*os.File, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	guestEnd := os.NewFile(uintptr(fds[0]), "guest")
	hf := os.NewFile(uintptr(fds[1]), "host")
	defer hf.Close()
	hostEnd, err := net.FileConn(hf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { guestEnd.Close() })
	return guestEnd, hostEnd
}

type result struct {
	f   *Frame
	err error
}

// nextAsync runs Next in the background.
func nextAsync(ch *Channel) <-chan result {
	out := make(chan result, 1)
	go func() { f, err := ch.Next(); out <- result{f, err} }()
	return out
}

func wait[T any](t *testing.T, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
	panic("unreachable")
}

func logFrame(line string) *Frame { return &Frame{Type: TypeLog, Stream: "stdout", Line: line} }

// TestChannelNewestConnectionWins: init's session as an agent restart
// sees it. The first agent gets ready, sends the config and receives
// logs; a second agent connects (the first one is not even gone), its
// connection replaces the first, receives the log frames from then on
// and the exit frame, and its stop frame reaches the Next that was
// blocked reading the first connection. No second ready: init has its
// config.
func TestChannelNewestConnectionWins(t *testing.T) {
	ch := NewChannel()
	defer ch.Close()
	g1, h1c := socketpair(t)
	h1 := newHost(t, h1c)
	ch.Accept(g1)
	ch.Greet(&Frame{Type: TypeReady})
	next := nextAsync(ch)
	h1.expect(TypeReady, "")
	h1.send(&Frame{Type: TypeConfig, Config: &Config{Cmd: []string{"/app"}}})
	if r := wait(t, next, "config"); r.err != nil || r.f.Type != TypeConfig || r.f.Config.Argv()[0] != "/app" {
		t.Fatalf("config: %+v %v", r.f, r.err)
	}
	ch.Greet(nil)
	if err := ch.Send(logFrame("one")); err != nil {
		t.Fatal(err)
	}
	h1.expect(TypeLog, "one")

	next = nextAsync(ch) // blocked on the first connection
	g2, h2c := socketpair(t)
	h2 := newHost(t, h2c)
	ch.Accept(g2)
	// The first connection is closed: its agent sees EOF.
	h1.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if f, err := h1.r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("old connection after a new one: %+v %v, want EOF", f, err)
	}
	for _, l := range []string{"two", "three"} {
		if err := ch.Send(logFrame(l)); err != nil {
			t.Fatal(err)
		}
		h2.expect(TypeLog, l)
	}
	h2.send(&Frame{Type: TypeStop})
	if r := wait(t, next, "stop"); r.err != nil || r.f.Type != TypeStop {
		t.Fatalf("stop on the new connection: %+v %v", r.f, r.err)
	}
	code := 0
	if err := ch.Send(&Frame{Type: TypeExit, Code: &code}); err != nil {
		t.Fatal(err)
	}
	h2.expect(TypeExit, "")
}

// TestChannelGreetsEachConnectionUntilConfigured: an agent that goes away
// between ready and config leaves init waiting; the next agent is greeted
// with ready again and its config is the one Next returns.
func TestChannelGreetsEachConnectionUntilConfigured(t *testing.T) {
	ch := NewChannel()
	defer ch.Close()
	ch.Greet(&Frame{Type: TypeReady})
	next := nextAsync(ch) // before any connection, as init starts
	g1, h1c := net.Pipe()
	h1 := newHost(t, h1c)
	ch.Accept(g1)
	h1.expect(TypeReady, "")
	h1.conn.Close()
	g2, h2c := net.Pipe()
	h2 := newHost(t, h2c)
	ch.Accept(g2)
	h2.expect(TypeReady, "")
	h2.send(&Frame{Type: TypeConfig, Config: &Config{Cmd: []string{"/second"}}})
	if r := wait(t, next, "config"); r.err != nil || r.f.Config.Argv()[0] != "/second" {
		t.Fatalf("config: %+v %v", r.f, r.err)
	}
}

// TestChannelSendWaitsAndMovesOn: a frame sent before any connection goes
// to the first one; a write blocked on a connection whose agent stopped
// reading moves whole to the connection that replaces it.
func TestChannelSendWaitsAndMovesOn(t *testing.T) {
	ch := NewChannel()
	defer ch.Close()
	sent := make(chan error, 1)
	go func() { sent <- ch.Send(logFrame("early")) }()
	select {
	case err := <-sent:
		t.Fatalf("Send without a connection returned %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	g1, h1c := net.Pipe() // unbuffered: a write blocks until the host reads
	h1 := newHost(t, h1c)
	ch.Accept(g1)
	h1.expect(TypeLog, "early")
	if err := wait(t, sent, "Send"); err != nil {
		t.Fatal(err)
	}
	go func() { sent <- ch.Send(logFrame("stuck")) }() // h1 does not read
	time.Sleep(20 * time.Millisecond)
	g2, h2c := net.Pipe()
	h2 := newHost(t, h2c)
	ch.Accept(g2)
	h2.expect(TypeLog, "stuck")
	if err := wait(t, sent, "Send"); err != nil {
		t.Fatal(err)
	}
}

// TestChannelBadFrameKeepsConnection: a malformed frame is reported and
// the next frame on the same connection is read.
func TestChannelBadFrameKeepsConnection(t *testing.T) {
	ch := NewChannel()
	g, hc := socketpair(t)
	ch.Accept(g)
	go hc.Write([]byte("not json\n{\"type\":\"stop\"}\n"))
	if _, err := ch.Next(); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("malformed frame: %v, want ErrBadFrame", err)
	}
	if f, err := ch.Next(); err != nil || f.Type != TypeStop {
		t.Fatalf("frame after a malformed one: %+v %v", f, err)
	}
	next := nextAsync(ch)
	ch.Close()
	if r := wait(t, next, "Next after Close"); !errors.Is(r.err, ErrClosed) {
		t.Fatalf("Next after Close: %v", r.err)
	}
	if err := ch.Send(logFrame("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Send after Close: %v", err)
	}
}
