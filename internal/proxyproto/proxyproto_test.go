package proxyproto

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestV2Bytes checks the encoder against the byte layout of the
// specification (section 2.2): signature, 0x21 (v2, PROXY), 0x11 (TCP4),
// length 12, src addr, dst addr, src port, dst port.
func TestV2Bytes(t *testing.T) {
	got := AppendProxy(nil, 2, netip.MustParseAddrPort("192.168.0.1:56324"), netip.MustParseAddrPort("192.168.0.11:443"))
	want := mustHex(t, "0d0a0d0a000d0a515549540a 21 11 000c c0a80001 c0a8000b dc04 01bb")
	if !bytes.Equal(got, want) {
		t.Fatalf("v2 TCP4 header\n got %x\nwant %x", got, want)
	}
	got = AppendProxy(nil, 2, netip.MustParseAddrPort("[2001:db8::1]:1"), netip.MustParseAddrPort("[2001:db8::2]:2"))
	want = mustHex(t, "0d0a0d0a000d0a515549540a 21 21 0024 20010db8000000000000000000000001 20010db8000000000000000000000002 0001 0002")
	if !bytes.Equal(got, want) {
		t.Fatalf("v2 TCP6 header\n got %x\nwant %x", got, want)
	}
	local := (&Header{Version: 2, Command: Local}).Format()
	if !bytes.Equal(local, mustHex(t, "0d0a0d0a000d0a515549540a 20 00 0000")) {
		t.Fatalf("v2 LOCAL header %x", local)
	}
	src := &net.TCPAddr{IP: net.IPv4(192, 168, 0, 1), Port: 56324}
	dst := &net.TCPAddr{IP: net.IPv4(192, 168, 0, 11), Port: 443}
	if v2 := (&Header{Version: 2, Command: Proxy, Source: src, Destination: dst}).Format(); !bytes.Equal(v2, mustHex(t, "0d0a0d0a000d0a515549540a 21 11 000c c0a80001 c0a8000b dc04 01bb")) {
		t.Fatalf("Format v2 %x", v2)
	}
	v1 := (&Header{Version: 1, Command: Proxy, Source: src, Destination: dst}).Format()
	if string(v1) != "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" {
		t.Fatalf("v1 header %q", v1)
	}
}

func TestRead(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		src     string
		wantErr bool
		noHdr   bool
		rest    string
	}{
		{name: "v1 tcp4", in: []byte("PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\nGET /"), src: "255.255.255.255:65535", rest: "GET /"},
		{name: "v1 tcp6", in: []byte("PROXY TCP6 ffff:f::ffff ::1 65535 443\r\nx"), src: "[ffff:f::ffff]:65535", rest: "x"},
		{name: "v1 unknown", in: []byte("PROXY UNKNOWN ffff:f::ffff ::1 65535 443\r\nx"), rest: "x"},
		{name: "v1 no crlf", in: []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), wantErr: true},
		{name: "v1 family mismatch", in: []byte("PROXY TCP4 ::1 ::1 1 2\r\n"), wantErr: true},
		{name: "v1 port leading zero", in: []byte("PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"), wantErr: true},
		{name: "v1 port too big", in: []byte("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"), wantErr: true},
		{name: "v1 too long", in: []byte("PROXY TCP4 " + strings.Repeat("1", 120) + "\r\n"), wantErr: true},
		{name: "v2 tcp4", in: append(mustHex(t, "0d0a0d0a000d0a515549540a 21 11 000c 01020304 05060708 0050 01bb"), "hi"...), src: "1.2.3.4:80", rest: "hi"},
		{name: "v2 tcp4 with tlv", in: append(mustHex(t, "0d0a0d0a000d0a515549540a 21 11 0010 01020304 05060708 0050 01bb 04 0001 00"), "hi"...), src: "1.2.3.4:80", rest: "hi"},
		{name: "v2 truncated tlv", in: mustHex(t, "0d0a0d0a000d0a515549540a 21 11 000f 01020304 05060708 0050 01bb 04 0005"), wantErr: true},
		{name: "v2 local", in: append(mustHex(t, "0d0a0d0a000d0a515549540a 20 00 0000"), "z"...), rest: "z"},
		{name: "v2 bad version", in: mustHex(t, "0d0a0d0a000d0a515549540a 11 11 000c 01020304 05060708 0050 01bb"), wantErr: true},
		{name: "v2 short ipv4 block", in: mustHex(t, "0d0a0d0a000d0a515549540a 21 11 0004 01020304"), wantErr: true},
		{name: "v2 udp", in: mustHex(t, "0d0a0d0a000d0a515549540a 21 12 000c 01020304 05060708 0050 01bb"), wantErr: true},
		{name: "v2 huge", in: mustHex(t, "0d0a0d0a000d0a515549540a 21 11 ffff"), wantErr: true},
		{name: "plain http", in: []byte("GET / HTTP/1.1\r\n"), noHdr: true, rest: "GET / HTTP/1.1\r\n"},
		{name: "post", in: []byte("POST / HTTP/1.1\r\n"), noHdr: true, rest: "POST / HTTP/1.1\r\n"},
		{name: "tls", in: []byte{0x16, 0x03, 0x01, 0x00}, noHdr: true, rest: "\x16\x03\x01\x00"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := bufio.NewReader(bytes.NewReader(tt.in))
			h, err := Read(r)
			if tt.noHdr {
				if !errors.Is(err, ErrNoHeader) {
					t.Fatalf("err = %v, want ErrNoHeader", err)
				}
			} else if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if err != nil && !tt.noHdr {
				return
			}
			if tt.src != "" && (h.Source == nil || h.Source.String() != tt.src) {
				t.Fatalf("source = %v, want %s", h.Source, tt.src)
			}
			rest, _ := io.ReadAll(r)
			if string(rest) != tt.rest {
				t.Fatalf("rest = %q, want %q", rest, tt.rest)
			}
		})
	}
}

func FuzzRead(f *testing.F) {
	f.Add([]byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"))
	f.Add([]byte("PROXY UNKNOWN\r\n"))
	f.Add(AppendProxy(nil, 2, netip.MustParseAddrPort("1.2.3.4:1"), netip.MustParseAddrPort("5.6.7.8:2")))
	f.Add(AppendProxy(nil, 2, netip.MustParseAddrPort("[::1]:1"), netip.MustParseAddrPort("[::2]:2")))
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := Read(bufio.NewReader(bytes.NewReader(in)))
		if err != nil {
			return
		}
		// A parsed PROXY header must survive a round trip.
		if h.Command == Proxy && h.Source != nil {
			h2, err := Read(bufio.NewReader(bytes.NewReader(h.Format())))
			if err != nil || h2.Source.String() != h.Source.String() || h2.Destination.String() != h.Destination.String() {
				t.Fatalf("round trip of %+v: %+v, %v", h, h2, err)
			}
		}
	})
}

func TestParseTrusted(t *testing.T) {
	trusted, err := ParseTrusted([]string{"10.0.0.0/8", "127.0.0.1", " ::1 "})
	if err != nil {
		t.Fatal(err)
	}
	for ip, want := range map[string]bool{"10.1.2.3": true, "127.0.0.1": true, "127.0.0.2": false, "::1": true, "::ffff:10.0.0.1": true, "192.168.1.1": false} {
		if got := trusted(net.ParseIP(ip)); got != want {
			t.Errorf("trusted(%s) = %v, want %v", ip, got, want)
		}
	}
	if _, err := ParseTrusted([]string{"10.0.0.0/33", "nope"}); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("err = %v", err)
	}
}

// TestListener checks that a trusted peer's header sets RemoteAddr, a
// header from an untrusted peer is rejected, and a silent client does not
// block Accept for others.
func TestListener(t *testing.T) {
	for _, tt := range []struct {
		name      string
		trusted   bool
		send      []byte
		wantAddr  string
		wantErr   bool
		wantBytes string
	}{
		{"trusted v2", true, append(AppendProxy(nil, 2, netip.MustParseAddrPort("203.0.113.7:4242"), netip.MustParseAddrPort("10.0.0.1:443")), "hello"...), "203.0.113.7:4242", false, "hello"},
		{"trusted v1", true, []byte("PROXY TCP4 198.51.100.2 10.0.0.1 5000 443\r\nhello"), "198.51.100.2:5000", false, "hello"},
		{"trusted without header", true, []byte("hello"), "127.0.0.1", false, "hello"},
		{"untrusted with header", false, []byte("PROXY TCP4 198.51.100.2 10.0.0.1 5000 443\r\nhello"), "", true, ""},
		{"untrusted plain", false, []byte("hello"), "127.0.0.1", false, "hello"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			inner, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			var rejected int
			ln := NewListener(inner, ListenerConfig{Trusted: func(net.IP) bool { return tt.trusted }, HeaderTimeout: 2 * time.Second, OnReject: func(net.Addr, error) { rejected++ }})
			defer ln.Close()
			// A client that connects and sends nothing must not block Accept.
			silent, err := net.Dial("tcp", inner.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer silent.Close()
			if _, err := ln.Accept(); err != nil {
				t.Fatal(err)
			}
			c, err := net.Dial("tcp", inner.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(tt.send); err != nil {
				t.Fatal(err)
			}
			sc, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer sc.Close()
			buf := make([]byte, 5)
			_, err = io.ReadFull(sc, buf)
			if tt.wantErr {
				if err == nil || rejected != 1 {
					t.Fatalf("read err = %v, rejected = %d; want a rejection", err, rejected)
				}
				return
			}
			if err != nil || string(buf) != tt.wantBytes {
				t.Fatalf("read %q, %v", buf, err)
			}
			if got := sc.RemoteAddr().String(); !strings.HasPrefix(got, tt.wantAddr) {
				t.Fatalf("RemoteAddr = %s, want %s", got, tt.wantAddr)
			}
		})
	}
}

// TestListenerShortNonHeader: a trusted client whose first message is
// shorter than a signature but already differs from it ("PRX", "\r\n\r\nX")
// is served at once, not after the header timeout.
func TestListenerShortNonHeader(t *testing.T) {
	for _, first := range []string{"PRX", "\r\n\r\nX", "P\r"} {
		inner, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ln := NewListener(inner, ListenerConfig{Trusted: func(net.IP) bool { return true }, HeaderTimeout: time.Hour})
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(c, first); err != nil {
			t.Fatal(err)
		}
		sc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan string, 1)
		go func() {
			buf := make([]byte, len(first))
			_, _ = io.ReadFull(sc, buf)
			got <- string(buf)
		}()
		select {
		case g := <-got:
			if g != first {
				t.Fatalf("read %q, want %q", g, first)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%q: still waiting for a PROXY header", first)
		}
		c.Close()
		sc.Close()
		ln.Close()
	}
}

// TestListenerRequired: with Required, a trusted peer without a header is
// rejected, and a silent one is dropped after HeaderTimeout.
func TestListenerRequired(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var rejects []error
	ln := NewListener(inner, ListenerConfig{Trusted: func(net.IP) bool { return true }, Required: true, HeaderTimeout: 200 * time.Millisecond,
		OnReject: func(_ net.Addr, err error) { mu.Lock(); rejects = append(rejects, err); mu.Unlock() }})
	defer ln.Close()
	for _, send := range []string{"GET / HTTP/1.1\r\n\r\n", ""} {
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, _ = io.WriteString(c, send)
		sc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if n, err := sc.Read(make([]byte, 10)); err == nil {
			t.Fatalf("%q: read %d bytes from a connection without the required header", send, n)
		}
		sc.Close()
	}
	mu.Lock()
	defer mu.Unlock()
	if len(rejects) != 2 {
		t.Fatalf("rejections: %v", rejects)
	}
}
