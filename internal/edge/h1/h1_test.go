package h1

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/textproto"
	"strings"
	"testing"
)

var requestSeeds = []string{
	"GET / HTTP/1.1\r\nHost: a.zeitwork.app\r\n\r\n",
	"GET /p?q=1&r=%20 HTTP/1.1\r\nHost: a.zeitwork.app:8443\r\nUser-Agent: wrk\r\nAccept: */*\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
	"HEAD /x HTTP/1.1\r\nhost: [::1]:80\r\nConnection: close\r\n\r\n",
	"OPTIONS /x HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nCookie: a=b; c=d\r\nX-Empty:\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: h\r\n Folded: x\r\n\r\n",
	"GET / HTTP/1.1\nHost: h\n\n",
	"GET / HTTP/1.0\r\nHost: h\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx",
	"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n",
	"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
	"GET /%zz HTTP/1.1\r\nHost: h\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: h\r\nX: caf\xc3\xa9\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: h\r",
}

func TestParseRequest(t *testing.T) {
	plain := map[int]bool{0: true, 1: true, 2: true, 3: true, 16: true}
	for i, s := range requestSeeds {
		var r Request
		n, err := ParseRequest([]byte(s), &r)
		if plain[i] != (err == nil) {
			t.Errorf("seed %d %q: err %v, want plain=%v", i, s, err, plain[i])
		}
		if err == nil && n != len(s) {
			t.Errorf("seed %d: length %d, want %d", i, n, len(s))
		}
	}
	var r Request
	if _, err := ParseRequest([]byte(requestSeeds[1][:40]), &r); !errors.Is(err, ErrIncomplete) {
		t.Errorf("a truncated head: %v, want ErrIncomplete", err)
	}
	if _, err := ParseRequest([]byte(requestSeeds[2]), &r); err != nil || !r.Close || string(r.Host) != "[::1]:80" || string(r.Method) != "HEAD" {
		t.Errorf("HEAD with close: %+v %v", r, err)
	}
	b := []byte(requestSeeds[1])
	if n := testing.AllocsPerRun(100, func() { _, _ = ParseRequest(b, &r) }); n != 0 {
		t.Errorf("ParseRequest allocates %.0f times per call", n)
	}
}

// FuzzParseRequest holds ParseRequest to net/http: whatever it accepts,
// http.ReadRequest accepts with the same method, target, host, connection
// handling and header values, and no body.
func FuzzParseRequest(f *testing.F) {
	for _, s := range requestSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var r Request
		n, err := ParseRequest(b, &r)
		if err != nil {
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b[:n])))
		if err != nil {
			t.Fatalf("accepted %q, net/http refuses it: %v", b[:n], err)
		}
		if req.Method != string(r.Method) || req.RequestURI != string(r.Target) || req.Host != string(r.Host) || req.Close != r.Close {
			t.Fatalf("%q: net/http reads %s %s host %q close %v; parsed %s %s host %q close %v",
				b[:n], req.Method, req.RequestURI, req.Host, req.Close, r.Method, r.Target, r.Host, r.Close)
		}
		if req.ContentLength != 0 || len(req.TransferEncoding) != 0 {
			t.Fatalf("%q: net/http sees a body", b[:n])
		}
		got := http.Header{}
		for _, h := range r.Headers {
			if h.Kind != Host {
				got.Add(string(h.Name), string(h.Value))
			}
		}
		want := req.Header
		for k, vv := range want {
			if strings.Join(got[k], "\x00") != strings.Join(vv, "\x00") {
				t.Fatalf("%q: header %s: net/http %q, parsed %q", b[:n], k, vv, got[k])
			}
		}
		if len(got) != len(want) {
			t.Fatalf("%q: headers: net/http %v, parsed %v", b[:n], want, got)
		}
	})
}

var responseSeeds = []string{
	"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
	"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n",
	"HTTP/1.1 200\r\nConnection: close\r\n\r\nuntil close",
	"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
	"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
	"HTTP/1.0 200 OK\r\n\r\n",
	"HTTP/1.1 2000 OK\r\n\r\n",
}

// TestResponses reads each seed with ParseResponse and ForwardBody and
// with net/http, and compares status, headers and body.
func TestResponses(t *testing.T) {
	malformed := map[int]bool{4: true, 5: true, 7: true, 8: true}
	for i, s := range responseSeeds {
		var r Response
		n, err := ParseResponse([]byte(s), &r)
		if malformed[i] {
			if err == nil {
				t.Errorf("seed %d: accepted %q", i, s)
			}
			continue
		}
		if err != nil {
			t.Fatalf("seed %d: %v", i, err)
		}
		checkResponse(t, []byte(s), n, &r)
	}
}

func FuzzResponse(f *testing.F) {
	for _, s := range responseSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var r Response
		n, err := ParseResponse(b, &r)
		if err != nil {
			return
		}
		checkResponse(t, b, n, &r)
	})
}

// checkResponse compares what the fast path reads of b with net/http.
func checkResponse(t *testing.T, b []byte, n int, r *Response) {
	t.Helper()
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(b)), &http.Request{Method: "GET"})
	if err != nil {
		t.Fatalf("accepted %q, net/http refuses it: %v", b[:n], err)
	}
	if resp.StatusCode != r.Status {
		t.Fatalf("%q: status %d, net/http %d", b[:n], r.Status, resp.StatusCode)
	}
	for _, h := range r.Headers {
		k := textproto.CanonicalMIMEHeaderKey(string(h.Name))
		if h.Kind == Other && !strings.Contains(strings.Join(resp.Header[k], "\x00"), string(h.Value)) {
			t.Fatalf("%q: header %s=%q not in net/http's %q", b[:n], k, h.Value, resp.Header[k])
		}
	}
	if r.BodyLess(false) {
		return
	}
	want, werr := io.ReadAll(resp.Body)
	var out bytes.Buffer
	src := bufio.NewReaderSize(bytes.NewReader(b[n:]), 16)
	_, ferr := ForwardBody(&out, src, r.Length, r.Chunked, noFlush{}, make([]byte, 7))
	if werr != nil || ferr != nil {
		if (werr == nil) != (ferr == nil) && ferr == nil {
			t.Fatalf("%q: net/http fails the body (%v), ForwardBody does not", b, werr)
		}
		return
	}
	got := out.Bytes()
	if r.Chunked {
		// Decode the forwarded framing with net/http's chunked reader.
		resp2, err := http.ReadResponse(bufio.NewReader(io.MultiReader(strings.NewReader("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), bytes.NewReader(got))), nil)
		if err != nil {
			t.Fatal(err)
		}
		if got, err = io.ReadAll(resp2.Body); err != nil {
			t.Fatalf("%q: the forwarded chunked body does not decode: %v", b, err)
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%q: body %q, net/http %q", b, got, want)
	}
}

func TestParseChunkSize(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "a": 10, "FF": 255, "10;ext=1": 16, "7fffffffffffffff": -1, "": -1, "x": -1, "1\x01": -1, "fffffffffffffff": 0xfffffffffffffff} {
		n, ok := ParseChunkSize([]byte(in))
		if (want < 0) == ok || ok && n != want {
			t.Errorf("ParseChunkSize(%q) = %d %v, want %d", in, n, ok, want)
		}
	}
}

type noFlush struct{}

func (noFlush) Flush() error { return nil }
