package main

import (
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/guest"
)

// unixAcceptor stands in for the vsock listener: a Unix socket listener
// whose connections are what init accepts from successive node agents.
type unixAcceptor struct{ l net.Listener }

func (u unixAcceptor) Accept() (io.ReadWriteCloser, error) {
	c, err := u.l.Accept()
	if errors.Is(err, net.ErrClosed) {
		return nil, os.ErrClosed // as a closed vsockListener reports it
	}
	return c, err
}

func dialHost(t *testing.T, path string) (net.Conn, *guest.Reader, *guest.Writer) {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	return c, guest.NewReader(c), guest.NewWriter(c)
}

func expectFrame(t *testing.T, r *guest.Reader, typ, line string) {
	t.Helper()
	f, err := r.Next()
	if err != nil || f.Type != typ || f.Line != line {
		t.Fatalf("host: want %s %q, got %+v %v", typ, line, f, err)
	}
}

// TestAcceptLoopSwitchesToNewestAgent drives init's vsock path with Unix
// sockets for the accepted connections: the first agent gets ready and
// sends the config; a restarted agent's connection replaces it, and the
// log frames, the stop request and the exit frame use the new one.
func TestAcceptLoopSwitchesToNewestAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ch := guest.NewChannel()
	defer ch.Close()
	loopDone := make(chan struct{})
	go func() { acceptLoop(unixAcceptor{l}, ch); close(loopDone) }()

	ch.Greet(&guest.Frame{Type: guest.TypeReady})
	_, r1, w1 := dialHost(t, sock)
	got := make(chan *guest.Frame, 1)
	go func() {
		f, err := ch.Next()
		if err != nil {
			t.Error(err)
		}
		got <- f
	}()
	expectFrame(t, r1, guest.TypeReady, "")
	if err := w1.Send(&guest.Frame{Type: guest.TypeConfig, Config: &guest.Config{Cmd: []string{"/app"}}}); err != nil {
		t.Fatal(err)
	}
	if f := <-got; f == nil || f.Type != guest.TypeConfig {
		t.Fatalf("init: want config, got %+v", f)
	}
	ch.Greet(nil)
	if err := ch.Send(&guest.Frame{Type: guest.TypeLog, Stream: "stdout", Line: "first"}); err != nil {
		t.Fatal(err)
	}
	expectFrame(t, r1, guest.TypeLog, "first")

	go func() { // init's stop reader, blocked on the first connection
		f, err := ch.Next()
		if err != nil {
			t.Error(err)
		}
		got <- f
	}()
	_, r2, w2 := dialHost(t, sock)
	// The first agent's connection ends once the second is accepted.
	if f, err := r1.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("first agent after the second connected: %+v %v, want EOF", f, err)
	}
	if err := ch.Send(&guest.Frame{Type: guest.TypeLog, Stream: "stdout", Line: "second"}); err != nil {
		t.Fatal(err)
	}
	expectFrame(t, r2, guest.TypeLog, "second")
	if err := w2.Send(&guest.Frame{Type: guest.TypeStop}); err != nil {
		t.Fatal(err)
	}
	select {
	case f := <-got:
		if f == nil || f.Type != guest.TypeStop {
			t.Fatalf("init: want stop, got %+v", f)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the stop frame on the new connection did not reach init")
	}
	code := 143
	if err := ch.Send(&guest.Frame{Type: guest.TypeExit, Code: &code}); err != nil {
		t.Fatal(err)
	}
	expectFrame(t, r2, guest.TypeExit, "")

	l.Close()
	select {
	case <-loopDone:
	case <-time.After(5 * time.Second):
		t.Fatal("acceptLoop did not end when its listener closed")
	}
}

// eofReader is a virtio port whose host side is away for a while: reads
// return EOF at once, then data.
type eofReader struct {
	eofs int
	data string
}

func (e *eofReader) Read(b []byte) (int, error) {
	if e.eofs > 0 {
		e.eofs--
		return 0, io.EOF
	}
	if e.data == "" {
		return 0, io.ErrUnexpectedEOF
	}
	n := copy(b, e.data)
	e.data = e.data[n:]
	return n, nil
}

func (e *eofReader) Write(b []byte) (int, error) { return len(b), nil }

// TestVirtioPortWaitsForHost: EOF on the port means the host is away, not
// the end of the connection: the channel reads the next agent's frames on
// the same port.
func TestVirtioPortWaitsForHost(t *testing.T) {
	port := &eofReader{eofs: 3, data: `{"type":"stop"}` + "\n"}
	ch := guest.NewChannel()
	ch.Accept(virtioPort{f: port, retry: time.Millisecond})
	f, err := ch.Next()
	if err != nil || f.Type != guest.TypeStop || port.eofs != 0 {
		t.Fatalf("frame after the host came back: %+v %v (%d EOFs left)", f, err, port.eofs)
	}
	if err := (virtioPort{f: port}).Close(); err != nil {
		t.Fatal(err)
	}
}

// TestVsockListener: these hosts have AF_VSOCK (no loopback transport, so
// nothing can connect): the listener binds and listens as init's does,
// and closing it ends a blocked Accept, and so acceptLoop.
func TestVsockListener(t *testing.T) {
	l, err := listenVsock(unix.VMADDR_PORT_ANY)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { acceptLoop(l, guest.NewChannel()); close(done) }()
	time.Sleep(20 * time.Millisecond)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end a blocked vsock Accept")
	}
	if _, err := l.Accept(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
}
