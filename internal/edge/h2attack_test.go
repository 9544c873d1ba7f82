package edge

import (
	"bytes"
	"crypto/tls"
	"io"
	"runtime"
	rtmetrics "runtime/metrics"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/zeitwork/zeitwork/internal/edge/h2"
)

// h2Raw is a hand-driven HTTP/2 client for sending what a well-behaved
// client never would.
type h2Raw struct {
	t    *testing.T
	c    *tls.Conn
	fr   *http2.Framer
	wmu  sync.Mutex
	enc  *hpack.Encoder
	hbuf bytes.Buffer
}

func dialH2Raw(t *testing.T, e *edgeEnv, settings ...http2.Setting) *h2Raw {
	t.Helper()
	c, err := tls.Dial("tcp", e.https, &tls.Config{RootCAs: e.ca, ServerName: "web-abc1234-acme.zeitwork.test", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if c.ConnectionState().NegotiatedProtocol != "h2" {
		t.Fatalf("ALPN: %q", c.ConnectionState().NegotiatedProtocol)
	}
	r := &h2Raw{t: t, c: c}
	r.fr = http2.NewFramer(c, c)
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	r.enc = hpack.NewEncoder(&r.hbuf)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := r.fr.WriteSettings(settings...); err != nil {
		t.Fatal(err)
	}
	return r
}

// block encodes a GET for path on the test host, plus extra fields.
func (r *h2Raw) block(path string, extra ...hpack.HeaderField) []byte {
	r.hbuf.Reset()
	for _, f := range append([]hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "https"},
		{Name: ":authority", Value: "web-abc1234-acme.zeitwork.test"}, {Name: ":path", Value: path}}, extra...) {
		_ = r.enc.WriteField(f)
	}
	return bytes.Clone(r.hbuf.Bytes())
}

func (r *h2Raw) get(id uint32, path string) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	return r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: r.block(path), EndStream: true, EndHeaders: true})
}

// readAll reads frames until the connection ends (or timeout) and
// reports what it saw: the GOAWAY code (or -1), frames, answers.
type h2Seen struct {
	goAway   http2.ErrCode
	gotAway  bool
	frames   int
	statuses map[string]int
	resets   map[http2.ErrCode]int
	data     int
	err      error // what ended the reading
}

func (r *h2Raw) readAll(timeout time.Duration, stop func(f http2.Frame) bool) h2Seen {
	s := h2Seen{statuses: map[string]int{}, resets: map[http2.ErrCode]int{}}
	_ = r.c.SetReadDeadline(time.Now().Add(timeout))
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			s.err = err
			return s
		}
		s.frames++
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			s.goAway, s.gotAway = f.ErrCode, true
		case *http2.MetaHeadersFrame:
			s.statuses[f.PseudoValue("status")]++
		case *http2.RSTStreamFrame:
			s.resets[f.ErrCode]++
		case *http2.DataFrame:
			s.data += len(f.Data())
		}
		if stop != nil && stop(f) {
			return s
		}
	}
}

// bounds records the process's goroutines, heap and CPU time before an
// attack, samples the heap during it and checks afterwards that all came
// back within limits.
type bounds struct {
	t          *testing.T
	goroutines int
	heap0      uint64
	cpu0       time.Duration
	peak       atomic.Uint64
	stop       chan struct{}
	done       sync.WaitGroup
}

func heapBytes() uint64 {
	s := []rtmetrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	rtmetrics.Read(s)
	return s[0].Value.Uint64()
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func watchBounds(t *testing.T) *bounds {
	runtime.GC()
	b := &bounds{t: t, goroutines: runtime.NumGoroutine(), heap0: heapBytes(), cpu0: cpuTime(), stop: make(chan struct{})}
	b.done.Go(func() {
		tk := time.NewTicker(5 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-b.stop:
				return
			case <-tk.C:
				if h := heapBytes(); h > b.peak.Load() {
					b.peak.Store(h)
				}
			}
		}
	})
	return b
}

// check: heap growth at the peak below maxHeap, CPU time (client side
// included) below maxCPU, goroutines back to where they were.
func (b *bounds) check(maxHeap uint64, maxCPU time.Duration) {
	t := b.t
	t.Helper()
	close(b.stop)
	b.done.Wait()
	cpu := cpuTime() - b.cpu0
	grown := int64(b.peak.Load()) - int64(b.heap0)
	t.Logf("heap peak +%d KiB, CPU %v", grown>>10, cpu.Round(time.Millisecond))
	if grown > int64(maxHeap) {
		t.Errorf("heap grew by %d KiB during the attack (limit %d KiB)", grown>>10, maxHeap>>10)
	}
	if cpu > maxCPU {
		t.Errorf("the attack cost %v of CPU (limit %v)", cpu, maxCPU)
	}
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > b.goroutines+5 {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines: %d before, %d after the attack\n%s", b.goroutines, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stillServes checks that the edge answers a fresh HTTP/2 client.
func stillServes(t *testing.T, e *edgeEnv) {
	t.Helper()
	code, body, _ := get(t, e.clientProto("", true), "https://web-abc1234-acme.zeitwork.test/")
	if code != 200 || !strings.Contains(body, "instance=") {
		t.Fatalf("after the attack: %d %q", code, body)
	}
}

// TestH2RapidReset: a client opening streams and resetting them at once
// (CVE-2023-44487) is answered GOAWAY ENHANCE_YOUR_CALM after a bounded
// number of streams, and the handlers it started end.
func TestH2RapidReset(t *testing.T) {
	e := startEdge(t, 0, 0)
	b := watchBounds(t)
	r := dialH2Raw(t, e)
	hdr := r.block("/slow?ms=300")
	var sent atomic.Int64
	go func() {
		for id := uint32(1); id < 200_000; id += 2 {
			r.wmu.Lock()
			err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hdr, EndStream: true, EndHeaders: true})
			if err == nil {
				err = r.fr.WriteRSTStream(id, http2.ErrCodeCancel)
			}
			r.wmu.Unlock()
			if err != nil {
				return
			}
			sent.Add(1)
		}
	}()
	seen := r.readAll(20*time.Second, func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok })
	if !seen.gotAway || seen.goAway != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("no GOAWAY ENHANCE_YOUR_CALM (got %v %v) after %d streams", seen.gotAway, seen.goAway, sent.Load())
	}
	t.Logf("GOAWAY after %d streams opened and reset", sent.Load())
	_ = r.c.Close()
	b.check(64<<20, 20*time.Second)
	stillServes(t, e)
}

// TestH2ContinuationFlood: a header block that never ends — endless empty
// CONTINUATION frames, or ones that keep adding fields
// (CVE-2024-27316 class) — ends the connection after a bounded amount.
func TestH2ContinuationFlood(t *testing.T) {
	e := startEdge(t, 0, 0)
	for _, tc := range []struct {
		name string
		frag []byte
	}{
		{"empty", nil},
		{"fields", func() []byte {
			var buf bytes.Buffer
			enc := hpack.NewEncoder(&buf)
			_ = enc.WriteField(hpack.HeaderField{Name: "x-pad", Value: strings.Repeat("p", 1000), Sensitive: true})
			return buf.Bytes()
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := watchBounds(t)
			r := dialH2Raw(t, e)
			var sent atomic.Int64
			go func() {
				r.wmu.Lock()
				defer r.wmu.Unlock()
				if r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: r.block("/"), EndHeaders: false, EndStream: true}) != nil {
					return
				}
				for range 2_000_000 {
					if r.fr.WriteContinuation(1, false, tc.frag) != nil {
						return
					}
					sent.Add(1)
				}
			}()
			seen := r.readAll(20*time.Second, nil)
			if !seen.gotAway {
				t.Fatalf("the connection ended without GOAWAY after %d CONTINUATION frames", sent.Load())
			}
			if n := sent.Load(); n >= 2_000_000 {
				t.Fatalf("the edge read all %d CONTINUATION frames", n)
			}
			t.Logf("GOAWAY %v after %d CONTINUATION frames", seen.goAway, sent.Load())
			b.check(32<<20, 10*time.Second)
		})
	}
	stillServes(t, e)
}

// TestH2ControlFloods: PING and SETTINGS floods end the connection with
// GOAWAY ENHANCE_YOUR_CALM.
func TestH2ControlFloods(t *testing.T) {
	e := startEdge(t, 0, 0)
	for _, tc := range []struct {
		name string
		send func(fr *http2.Framer) error
	}{
		{"ping", func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{1}) }},
		{"settings", func(fr *http2.Framer) error {
			return fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 65535})
		}},
		{"empty-data", func(fr *http2.Framer) error { return fr.WriteData(1, false, nil) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := watchBounds(t)
			r := dialH2Raw(t, e)
			if tc.name == "empty-data" { // a stream with a body to come
				blk := r.block("/slow?ms=5000")
				_ = r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: blk, EndHeaders: true})
			}
			var sent atomic.Int64
			go func() {
				for range 1_000_000 {
					r.wmu.Lock()
					err := tc.send(r.fr)
					r.wmu.Unlock()
					if err != nil {
						return
					}
					sent.Add(1)
				}
			}()
			seen := r.readAll(20*time.Second, func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok })
			if !seen.gotAway || seen.goAway != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("no GOAWAY ENHANCE_YOUR_CALM (got %v %v) after %d frames", seen.gotAway, seen.goAway, sent.Load())
			}
			t.Logf("GOAWAY after %d frames", sent.Load())
			_ = r.c.Close()
			b.check(32<<20, 10*time.Second)
		})
	}
	stillServes(t, e)
}

// TestH2HPACKBomb: one large field in the dynamic table referenced
// thousands of times (a header list that would decode to ~60 MiB) is cut
// at the header list limit and answered 431; the connection goes on.
func TestH2HPACKBomb(t *testing.T) {
	e := startEdge(t, 0, 0)
	b := watchBounds(t)
	r := dialH2Raw(t, e)
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, f := range []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "https"},
		{Name: ":authority", Value: "web-abc1234-acme.zeitwork.test"}, {Name: ":path", Value: "/"}} {
		_ = enc.WriteField(f)
	}
	_ = enc.WriteField(hpack.HeaderField{Name: "x-bomb", Value: strings.Repeat("b", 4000)}) // into the dynamic table (index 62)
	blk := buf.Bytes()
	for len(blk) < 15_000 {
		blk = append(blk, 0x80|62) // indexed: the 4 KB field again
	}
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: blk, EndStream: true, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	seen := r.readAll(10*time.Second, func(f http2.Frame) bool {
		_, ok := f.(*http2.MetaHeadersFrame)
		return ok
	})
	if seen.statuses["431"] != 1 {
		t.Fatalf("want a 431 answer, got %+v", seen)
	}
	// The same connection serves a normal request after it.
	if err := r.get(3, "/"); err != nil {
		t.Fatal(err)
	}
	seen = r.readAll(10*time.Second, func(f http2.Frame) bool {
		return f.Header().StreamID == 3 && f.Header().Flags.Has(http2.FlagDataEndStream)
	})
	if seen.statuses["200"] != 1 {
		t.Fatalf("after the bomb: %+v", seen)
	}
	_ = r.c.Close()
	b.check(32<<20, 10*time.Second)
	stillServes(t, e)
}

// TestH2ZeroWindow: a client that opens streams for large answers and
// never opens its flow-control window holds nothing past StallTimeout:
// each stream is reset, its node-agent connection freed.
func TestH2ZeroWindow(t *testing.T) {
	e := startEdge(t, 0, 0, func(s *Server) { s.H2 = h2.Config{StallTimeout: time.Second} })
	b := watchBounds(t)
	r := dialH2Raw(t, e, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	const streams = 100
	for i := range streams {
		if err := r.get(uint32(2*i+1), "/big"); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	var resets int
	seen := r.readAll(20*time.Second, func(f http2.Frame) bool {
		if rs, ok := f.(*http2.RSTStreamFrame); ok && rs.ErrCode == http2.ErrCodeFlowControl {
			resets++
		}
		return resets == streams
	})
	took := time.Since(start)
	if resets != streams || seen.data != 0 || seen.statuses["200"] != streams {
		t.Fatalf("%d of %d streams reset (%d data bytes sent into a closed window): %+v", resets, streams, seen.data, seen)
	}
	t.Logf("%d stalled streams reset in %v", streams, took.Round(time.Millisecond))
	_ = r.c.Close()
	b.check(64<<20, 10*time.Second)
	stillServes(t, e)
}
