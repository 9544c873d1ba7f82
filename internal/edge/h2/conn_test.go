package h2

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// answer200 answers every stream 200 with its request body echoed.
type answer200 struct{}

func (answer200) ServeH2(s *Stream) {
	if s.Path == "/abort" { // as httputil.ReverseProxy aborts an answer
		_ = s.WriteHeaders(200, nil, false)
		panic(http.ErrAbortHandler)
	}
	body, err := io.ReadAll(s)
	if err != nil {
		return
	}
	if s.WriteHeaders(200, []hpack.HeaderField{{Name: "content-type", Value: "text/plain"}}, false) == nil {
		_ = s.Write(append([]byte("ok "), body...), true)
	}
}

// serveBytes runs a connection that receives the client preface and then
// in, and returns what the server wrote; it fails when the connection
// does not end.
func serveBytes(t testing.TB, in []byte) []byte {
	cli, srv := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		ServeConn(srv, Config{IdleTimeout: time.Second, HandshakeTimeout: time.Second, WriteTimeout: time.Second, StallTimeout: time.Second}, answer200{}, nil)
	}()
	var out bytes.Buffer
	read := make(chan struct{})
	go func() { _, _ = io.Copy(&out, cli); close(read) }()
	_ = cli.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, _ = cli.Write(append([]byte(http2.ClientPreface), in...))
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection did not end")
	}
	_ = cli.Close()
	<-read
	return out.Bytes()
}

func frames(f func(fr *http2.Framer, enc *hpack.Encoder, hb *bytes.Buffer)) []byte {
	var b, hb bytes.Buffer
	fr := http2.NewFramer(&b, nil)
	f(fr, hpack.NewEncoder(&hb), &hb)
	return b.Bytes()
}

func getBlock(enc *hpack.Encoder, hb *bytes.Buffer, method string) []byte {
	return pathBlock(enc, hb, method, "/")
}

func pathBlock(enc *hpack.Encoder, hb *bytes.Buffer, method, path string) []byte {
	hb.Reset()
	for _, f := range []hpack.HeaderField{{Name: ":method", Value: method}, {Name: ":scheme", Value: "https"},
		{Name: ":authority", Value: "a.test"}, {Name: ":path", Value: path}} {
		_ = enc.WriteField(f)
	}
	return bytes.Clone(hb.Bytes())
}

// TestServeConn: a request with a body split over DATA frames is
// answered, the answer decodes, and the connection ends when the client
// goes.
func TestServeConn(t *testing.T) {
	in := frames(func(fr *http2.Framer, enc *hpack.Encoder, hb *bytes.Buffer) {
		_ = fr.WriteSettings()
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: getBlock(enc, hb, "POST"), EndHeaders: true})
		_ = fr.WriteData(1, false, []byte("hel"))
		_ = fr.WriteData(1, true, []byte("lo"))
	})
	out := serveBytes(t, in)
	fr := http2.NewFramer(nil, bytes.NewReader(out))
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	var status, body string
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			status = f.PseudoValue("status")
		case *http2.DataFrame:
			body += string(f.Data())
		}
	}
	if status != "200" || body != "ok hello" {
		t.Fatalf("status %q body %q", status, body)
	}
}

// TestHandlerAbort: a handler that aborts its answer by panicking with
// http.ErrAbortHandler resets its stream; the connection serves on.
func TestHandlerAbort(t *testing.T) {
	in := frames(func(fr *http2.Framer, enc *hpack.Encoder, hb *bytes.Buffer) {
		_ = fr.WriteSettings()
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: pathBlock(enc, hb, "GET", "/abort"), EndHeaders: true, EndStream: true})
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: getBlock(enc, hb, "GET"), EndHeaders: true, EndStream: true})
	})
	fr := http2.NewFramer(nil, bytes.NewReader(serveBytes(t, in)))
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	var reset http2.ErrCode = 99
	var ok3 bool
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			if f.StreamID == 1 {
				reset = f.ErrCode
			}
		case *http2.DataFrame:
			ok3 = ok3 || (f.StreamID == 3 && f.StreamEnded())
		}
	}
	if reset != http2.ErrCodeInternal || !ok3 {
		t.Fatalf("stream 1 reset %v, stream 3 answered %v", reset, ok3)
	}
}

// FuzzServeConn feeds arbitrary frames after the preface: the server
// never panics and always ends the connection.
func FuzzServeConn(f *testing.F) {
	f.Add([]byte{})
	f.Add(frames(func(fr *http2.Framer, enc *hpack.Encoder, hb *bytes.Buffer) {
		_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1})
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: getBlock(enc, hb, "GET"), EndHeaders: true, EndStream: true})
		_ = fr.WriteWindowUpdate(1, 100)
		_ = fr.WriteRSTStream(1, http2.ErrCodeCancel)
		_ = fr.WritePing(false, [8]byte{})
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: getBlock(enc, hb, "POST"), EndHeaders: false})
		_ = fr.WriteContinuation(3, true, nil)
		_ = fr.WriteData(3, true, []byte("x"))
		_ = fr.WriteGoAway(3, http2.ErrCodeNo, nil)
	}))
	f.Add(frames(func(fr *http2.Framer, enc *hpack.Encoder, hb *bytes.Buffer) {
		_ = fr.WriteSettings()
		_ = fr.WriteData(1, true, []byte("x"))
	}))
	f.Fuzz(func(t *testing.T, in []byte) {
		serveBytes(t, in)
	})
}
