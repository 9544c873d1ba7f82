// Package h2 is the edge's HTTP/2 server: one goroutine reads a
// connection's frames (golang.org/x/net/http2's Framer, HPACK from
// golang.org/x/net/http2/hpack), each request stream runs its Handler on a
// goroutine of its own, and answers are written through one buffered
// writer that a flusher empties once the goroutines ready at the time have
// run. Flow control and
// SETTINGS are honoured both ways; the known HTTP/2 attacks (rapid reset,
// CONTINUATION and HPACK floods, PING/SETTINGS floods, zero-window stalls)
// are bounded per connection (docs/adr/0502).
package h2

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Config bounds a connection. Zero fields take the defaults.
type Config struct {
	// MaxConcurrentStreams is advertised to the client (default 128).
	MaxConcurrentStreams uint32
	// StreamWindow and ConnWindow are the receive windows for request
	// bodies (defaults 256 KiB and 1 MiB): what a connection may buffer.
	StreamWindow, ConnWindow uint32
	// MaxHeaderListSize bounds a request's decoded header list (default
	// 64 KiB); a larger one is answered 431.
	MaxHeaderListSize uint32
	// IdleTimeout closes a connection without streams (default 120 s);
	// HandshakeTimeout bounds the client preface (default 10 s).
	IdleTimeout, HandshakeTimeout time.Duration
	// WriteTimeout ends a connection whose client does not take what is
	// written for this long (default 30 s).
	WriteTimeout time.Duration
	// StallTimeout resets a stream that waits this long for the client
	// to open its flow-control window (default 30 s).
	StallTimeout time.Duration
	Log          *slog.Logger
}

func (c *Config) defaults() {
	if c.MaxConcurrentStreams == 0 {
		c.MaxConcurrentStreams = 128
	}
	if c.StreamWindow == 0 {
		c.StreamWindow = 256 << 10
	}
	if c.ConnWindow == 0 {
		c.ConnWindow = 1 << 20
	}
	if c.MaxHeaderListSize == 0 {
		c.MaxHeaderListSize = 64 << 10
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 120 * time.Second
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = 30 * time.Second
	}
	if c.StallTimeout == 0 {
		c.StallTimeout = 30 * time.Second
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// Handler serves one request stream. It must end the stream (a response
// with its end, or Reset) before it returns; what it leaves open is
// reset.
type Handler interface {
	ServeH2(s *Stream)
}

// Flood limits per connection and second (docs/adr/0502).
const (
	maxPingsPerSec    = 500
	maxSettingsPerSec = 100
	maxEmptyPerSec    = 1000 // DATA frames without payload or END_STREAM
	// A client may reset this many streams per second before their
	// answers ended (a browser cancels a few; CVE-2023-44487 floods).
	maxResetsPerSec = 400
	// handlerFactor × MaxConcurrentStreams bounds the handlers running
	// on a connection, reset streams' included.
	handlerFactor = 2
	// readBudget bounds the bytes one frame read may take (a header
	// block with its CONTINUATION frames), and each read costs
	// readCost more: a CONTINUATION flood ends the connection.
	readCost = 64
)

// ServeConn serves an HTTP/2 connection whose TLS handshake negotiated h2
// until it ends (the client goes, an error, an idle timeout, or shutdown
// is closed: then GOAWAY, and the open streams finish). It waits for
// every stream's handler and closes nc.
func ServeConn(nc net.Conn, cfg Config, h Handler, shutdown <-chan struct{}) {
	cfg.defaults()
	c := &conn{cfg: cfg, nc: nc, h: h, streams: map[uint32]*Stream{}, peerWindow: 65535, peerInitial: 65535, peerMaxFrame: 16384,
		connRecv: int64(cfg.ConnWindow)}
	c.bw = bufio.NewWriterSize(nc, 32<<10)
	c.br = &budgetReader{r: bufio.NewReaderSize(nc, 16<<10)}
	c.fr = http2.NewFramer(c.bw, c.br)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = cfg.MaxHeaderListSize
	c.fr.SetMaxReadFrameSize(16 << 10)
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.work, c.stopWork, c.flushNow = make(chan *Stream), make(chan struct{}), make(chan struct{}, 1)
	c.flushDone = make(chan struct{})
	go c.flusher() // ends with stopWork, after the handlers
	c.serve(shutdown)
	c.wg.Wait() // bounded by WriteTimeout when a client does not read
	c.flushSync()
	<-c.flushDone
	_ = nc.Close()
}

// conn is one HTTP/2 connection.
type conn struct {
	cfg Config
	nc  net.Conn
	h   Handler
	br  *budgetReader
	fr  *http2.Framer // reads on the serve goroutine, writes under wmu
	wg  sync.WaitGroup

	// Writing: frames go to bw under wmu; the flusher sends them (see
	// write).
	wmu     sync.Mutex
	bw      *bufio.Writer
	henc    *hpack.Encoder
	hbuf    bytes.Buffer
	werr    error // the first write error; later writes fail with it
	pending bool  // a flush is signalled to the flusher
	// flushNow wakes the flusher; flushDone is closed when it ended.
	flushNow, flushDone chan struct{}
	// work hands a new stream to an idle handler goroutine; stopWork
	// ends the idle ones.
	work     chan *Stream
	stopWork chan struct{}
	wdl      time.Time // the write deadline in force

	mu           sync.Mutex // the fields below and every Stream's flow state
	streams      map[uint32]*Stream
	maxClientID  uint32
	handlers     int   // running handlers, reset streams' included
	peerWindow   int64 // connection send window
	peerInitial  int64 // the client's SETTINGS_INITIAL_WINDOW_SIZE
	peerMaxFrame uint32
	connRecv     int64 // connection receive window left
	connUnacked  int64 // consumed body bytes not yet returned to the client
	goingAway    bool
	closed       bool
	idleArmed    bool // the idle timeout is the read deadline

	// Flood accounting (serve goroutine only).
	second                      int64
	pings, settings, empty, rst int
}

// budgetReader counts what a frame read takes; a read past the budget
// fails.
type budgetReader struct {
	r      *bufio.Reader
	budget int
}

var errFlood = errors.New("h2: header block too large or too fragmented")

func (b *budgetReader) Read(p []byte) (int, error) {
	b.budget -= readCost
	if b.budget < 0 {
		return 0, errFlood
	}
	n, err := b.r.Read(p)
	b.budget -= n
	return n, err
}

func (c *conn) logf(msg string, args ...any) {
	c.cfg.Log.Debug(msg, append(args, "peer", c.nc.RemoteAddr().String())...)
}

func (c *conn) serve(shutdown <-chan struct{}) {
	defer c.closeAll()
	_ = c.nc.SetReadDeadline(time.Now().Add(c.cfg.HandshakeTimeout))
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c.br.r, preface[:]); err != nil || string(preface[:]) != http2.ClientPreface {
		c.logf("h2: bad client preface", "err", err)
		return
	}
	_ = c.write(func() error {
		if err := c.fr.WriteSettings(
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.cfg.MaxConcurrentStreams},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: c.cfg.StreamWindow},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: c.cfg.MaxHeaderListSize},
		); err != nil {
			return err
		}
		return c.fr.WriteWindowUpdate(0, c.cfg.ConnWindow-65535)
	})
	// Shutdown: GOAWAY, then the serve loop ends once no stream is left.
	stopShutdown := make(chan struct{})
	defer close(stopShutdown)
	c.wg.Go(func() {
		select {
		case <-shutdown:
			c.goAway(http2.ErrCodeNo, false)
		case <-stopShutdown:
		}
	})
	first := true
	for {
		c.mu.Lock()
		if c.goingAway && len(c.streams) == 0 {
			c.mu.Unlock()
			return
		}
		switch {
		case len(c.streams) > 0 && c.idleArmed:
			c.idleArmed = false
			_ = c.nc.SetReadDeadline(time.Time{})
		case len(c.streams) == 0 && !first && !c.idleArmed:
			c.idleArmed = true
			_ = c.nc.SetReadDeadline(time.Now().Add(c.cfg.IdleTimeout))
		}
		c.mu.Unlock()
		c.br.budget = 4*int(c.cfg.MaxHeaderListSize) + 64<<10
		f, err := c.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			var ce http2.ConnectionError
			switch {
			case errors.As(err, &se):
				if err := c.streamError(se.StreamID, se.Code); err != nil {
					c.connError(err)
					return
				}
				continue
			case errors.As(err, &ce):
				c.connError(err)
			case errors.Is(err, http2.ErrFrameTooLarge):
				c.connError(http2.ConnectionError(http2.ErrCodeFrameSize))
			case errors.Is(err, errFlood):
				c.logf("h2: header flood", "err", err)
				c.connError(http2.ConnectionError(http2.ErrCodeEnhanceYourCalm))
			default: // EOF, timeout, a read error
				c.logf("h2: connection ended", "err", err)
			}
			return
		}
		if first {
			if _, ok := f.(*http2.SettingsFrame); !ok {
				c.connError(http2.ConnectionError(http2.ErrCodeProtocol))
				return
			}
			first = false
			_ = c.nc.SetReadDeadline(time.Time{})
		}
		if err := c.process(f); err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				if err := c.streamError(se.StreamID, se.Code); err == nil {
					continue
				}
			}
			c.connError(err)
			return
		}
	}
}

// countFlood counts one frame of a kind and reports whether its limit per
// second is exceeded.
func (c *conn) countFlood(n *int, limit int) bool {
	if now := time.Now().Unix(); now != c.second {
		c.second = now
		c.pings, c.settings, c.empty, c.rst = 0, 0, 0, 0
	}
	*n++
	return *n > limit
}

var errCalm = http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)

func (c *conn) process(f http2.Frame) error {
	c.mu.Lock()
	away := c.goingAway && f.Header().StreamID > c.maxClientID
	c.mu.Unlock()
	if away { // streams after GOAWAY's last are ignored (RFC 9113 6.8)
		if d, ok := f.(*http2.DataFrame); ok {
			return c.refundConn(d.Length)
		}
		return nil
	}
	switch f := f.(type) {
	case *http2.SettingsFrame:
		return c.processSettings(f)
	case *http2.MetaHeadersFrame:
		return c.processHeaders(f)
	case *http2.DataFrame:
		return c.processData(f)
	case *http2.WindowUpdateFrame:
		return c.processWindowUpdate(f)
	case *http2.PingFrame:
		if f.IsAck() {
			return nil
		}
		if f.StreamID != 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if c.countFlood(&c.pings, maxPingsPerSec) {
			return errCalm
		}
		return c.write(func() error { return c.fr.WritePing(true, f.Data) })
	case *http2.RSTStreamFrame:
		return c.processReset(f)
	case *http2.PriorityFrame:
		if f.StreamID == f.StreamDep {
			return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol}
		}
		return nil
	case *http2.GoAwayFrame:
		c.mu.Lock()
		c.goingAway = true // no new streams; the open ones finish
		c.wakeIfDoneLocked()
		c.mu.Unlock()
		return nil
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	default: // unknown frame types are ignored
		return nil
	}
}

func (c *conn) processSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	if c.countFlood(&c.settings, maxSettingsPerSec) {
		return errCalm
	}
	if err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingHeaderTableSize:
			c.wmu.Lock()
			c.henc.SetMaxDynamicTableSize(s.Val)
			c.wmu.Unlock()
		case http2.SettingInitialWindowSize:
			c.mu.Lock()
			delta := int64(s.Val) - c.peerInitial
			c.peerInitial = int64(s.Val)
			for _, st := range c.streams {
				st.sendWindow += delta
				if st.sendWindow > 1<<31-1 {
					c.mu.Unlock()
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
				st.signal()
			}
			c.mu.Unlock()
		case http2.SettingMaxFrameSize:
			c.mu.Lock()
			c.peerMaxFrame = s.Val
			c.mu.Unlock()
		}
		return nil
	}); err != nil {
		return err
	}
	return c.write(func() error { return c.fr.WriteSettingsAck() })
}

func (c *conn) processWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		if f.Increment == 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		c.peerWindow += int64(f.Increment)
		if c.peerWindow > 1<<31-1 {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		for _, st := range c.streams {
			st.signal()
		}
		return nil
	}
	st := c.streams[f.StreamID]
	if st == nil {
		if f.StreamID > c.maxClientID {
			return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream
		}
		return nil // closed: allowed
	}
	if f.Increment == 0 {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol}
	}
	st.sendWindow += int64(f.Increment)
	if st.sendWindow > 1<<31-1 {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	st.signal()
	return nil
}

func (c *conn) processReset(f *http2.RSTStreamFrame) error {
	c.mu.Lock()
	if f.StreamID > c.maxClientID {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream
	}
	st := c.streams[f.StreamID]
	early := st != nil && !st.localDone
	if st != nil {
		c.closeStreamLocked(st, errReset)
	}
	c.mu.Unlock()
	if early && c.countFlood(&c.rst, maxResetsPerSec) {
		return errCalm
	}
	return nil
}

var (
	errReset      = errors.New("h2: stream reset by the client")
	errConnClosed = errors.New("h2: connection closed")
	errStalled    = errors.New("h2: the client's flow-control window stayed closed")
)

func (c *conn) processHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if id%2 != 1 {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.mu.Lock()
	if st := c.streams[id]; st != nil {
		defer c.mu.Unlock()
		if st.remoteDone {
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
		}
		return c.trailersLocked(st, f)
	}
	if id <= c.maxClientID {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.maxClientID = id
	if f.HasPriority() && f.Priority.StreamDep == id {
		c.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	if uint32(len(c.streams)) >= c.cfg.MaxConcurrentStreams {
		c.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	if c.handlers >= handlerFactor*int(c.cfg.MaxConcurrentStreams) {
		// Reset streams whose handlers still run: a rapid-reset client.
		c.mu.Unlock()
		if c.countFlood(&c.rst, maxResetsPerSec) {
			return errCalm
		}
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeRefusedStream}
	}
	c.mu.Unlock()

	st := &Stream{c: c, id: id, ContentLength: -1, wake: make(chan struct{}, 1)}
	for _, hf := range f.PseudoFields() {
		switch hf.Name {
		case ":method":
			st.Method = hf.Value
		case ":scheme":
			st.Scheme = hf.Value
		case ":authority":
			st.Authority = hf.Value
		case ":path":
			st.Path = hf.Value
		case ":protocol":
			st.Protocol = hf.Value
		}
	}
	st.Header = f.RegularFields()
	bad := st.Protocol != "" // extended CONNECT is not advertised
	if st.Method == "CONNECT" {
		bad = bad || st.Path != "" || st.Scheme != "" || st.Authority == ""
	} else {
		bad = bad || st.Method == "" || st.Path == "" || (st.Scheme != "https" && st.Scheme != "http")
	}
	for _, hf := range st.Header {
		switch hf.Name { // connection-specific fields are malformed (RFC 9113 8.2.2)
		case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
			bad = true
		case "te":
			bad = bad || hf.Value != "trailers"
		case "content-length":
			n, err := strconv.ParseInt(hf.Value, 10, 64)
			if err != nil || n < 0 || (st.ContentLength >= 0 && n != st.ContentLength) {
				bad = true
			}
			st.ContentLength = n
		}
	}
	if bad {
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	if st.Authority == "" {
		for _, hf := range st.Header {
			if hf.Name == "host" {
				st.Authority = hf.Value
				break
			}
		}
	}
	st.TooLarge = f.Truncated
	st.remoteDone = f.StreamEnded()
	if st.remoteDone && st.ContentLength > 0 {
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	st.ctx, st.cancel = context.WithCancel(context.Background())
	c.mu.Lock()
	st.sendWindow = c.peerInitial
	st.recvWindow = int64(c.cfg.StreamWindow)
	c.streams[id] = st
	c.handlers++
	c.mu.Unlock()
	select {
	case c.work <- st: // an idle handler goroutine, its stack already grown
	default:
		c.wg.Go(func() { c.worker(st) })
	}
	return nil
}

// trailersLocked takes a request's trailers (c.mu held).
func (c *conn) trailersLocked(st *Stream, f *http2.MetaHeadersFrame) error {
	if !f.StreamEnded() || len(f.PseudoFields()) > 0 {
		return http2.StreamError{StreamID: st.id, Code: http2.ErrCodeProtocol}
	}
	if st.ContentLength >= 0 && st.received != st.ContentLength {
		return http2.StreamError{StreamID: st.id, Code: http2.ErrCodeProtocol}
	}
	st.trailer = f.RegularFields()
	st.remoteDone = true
	c.maybeForgetLocked(st)
	st.signal()
	return nil
}

func (c *conn) processData(f *http2.DataFrame) error {
	id := f.StreamID
	c.mu.Lock()
	if id == 0 || id > c.maxClientID {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	if int64(f.Length) > c.connRecv {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	st := c.streams[id]
	if st == nil || st.remoteDone {
		c.mu.Unlock()
		if err := c.refundConn(f.Length); err != nil {
			return err
		}
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
	}
	if int64(f.Length) > st.recvWindow {
		c.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeFlowControl}
	}
	data := f.Data()
	if st.ContentLength >= 0 && st.received+int64(len(data)) > st.ContentLength {
		c.mu.Unlock()
		if err := c.refundConn(f.Length); err != nil {
			return err
		}
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	c.connRecv -= int64(f.Length)
	st.recvWindow -= int64(f.Length)
	st.received += int64(len(data))
	st.body = append(st.body, data...)
	pad := int64(f.Length) - int64(len(data))
	st.unacked += pad
	c.connUnacked += pad
	if f.StreamEnded() {
		if st.ContentLength >= 0 && st.received != st.ContentLength {
			c.mu.Unlock()
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
		}
		st.remoteDone = true
		c.maybeForgetLocked(st)
	}
	st.signal()
	empty := f.Length == 0 && !f.StreamEnded()
	c.mu.Unlock()
	if empty && c.countFlood(&c.empty, maxEmptyPerSec) {
		return errCalm
	}
	if pad > 0 {
		return c.ackRecv(st)
	}
	return nil
}

// refundConn returns the connection-level credit of a DATA frame the
// server drops.
func (c *conn) refundConn(n uint32) error {
	if n == 0 {
		return nil
	}
	return c.write(func() error { return c.fr.WriteWindowUpdate(0, n) })
}

// streamError resets a stream with code; an error resetting it ends the
// connection.
func (c *conn) streamError(id uint32, code http2.ErrCode) error {
	c.mu.Lock()
	if st := c.streams[id]; st != nil {
		c.closeStreamLocked(st, fmt.Errorf("h2: stream error %v", code))
	}
	c.mu.Unlock()
	return c.write(func() error { return c.fr.WriteRSTStream(id, code) })
}

// connError sends GOAWAY with err's code (a ConnectionError's, else
// INTERNAL_ERROR) before the connection closes.
func (c *conn) connError(err error) {
	code := http2.ErrCodeInternal
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		code = http2.ErrCode(ce)
	}
	c.logf("h2: connection error", "err", err)
	c.goAway(code, true)
	// Closing with unread bytes would reset the connection and could
	// lose the GOAWAY: read what the client still sends for a moment.
	_ = c.nc.SetReadDeadline(time.Now().Add(time.Second))
	_, _ = io.CopyN(io.Discard, c.br.r, 1<<20)
}

func (c *conn) goAway(code http2.ErrCode, final bool) {
	c.mu.Lock()
	last := c.maxClientID
	c.goingAway = true
	c.mu.Unlock()
	_ = c.write(func() error { return c.fr.WriteGoAway(last, code, nil) })
	c.flushSync()
	if !final {
		c.mu.Lock()
		c.wakeIfDoneLocked()
		c.mu.Unlock()
	}
}

// wakeIfDoneLocked arms the idle timeout when the last stream ended, and
// ends the reader's wait at once when the connection is going away
// (c.mu held).
func (c *conn) wakeIfDoneLocked() {
	switch {
	case len(c.streams) > 0:
	case c.goingAway:
		_ = c.nc.SetReadDeadline(time.Now())
	case !c.idleArmed:
		c.idleArmed = true
		_ = c.nc.SetReadDeadline(time.Now().Add(c.cfg.IdleTimeout))
	}
}

// closeAll ends every stream when the serve loop ends.
func (c *conn) closeAll() {
	close(c.stopWork)
	c.mu.Lock()
	c.closed = true
	for _, st := range c.streams {
		c.closeStreamLocked(st, errConnClosed)
	}
	c.mu.Unlock()
}

// closeStreamLocked forgets st and ends what waits on it (c.mu held).
func (c *conn) closeStreamLocked(st *Stream, err error) {
	if st.err == nil {
		st.err = err
	}
	if st.cancel != nil {
		st.cancel()
	}
	if st.abort != nil {
		_ = st.abort.Close()
		st.abort = nil
	}
	if c.streams[st.id] == st {
		delete(c.streams, st.id)
		c.wakeIfDoneLocked()
	}
	st.signal()
}

// maybeForgetLocked forgets st once both sides ended it.
func (c *conn) maybeForgetLocked(st *Stream) {
	if st.remoteDone && st.localDone && c.streams[st.id] == st {
		delete(c.streams, st.id)
		c.wakeIfDoneLocked()
	}
}

// write runs fn (which writes frames) under the write lock. The flush
// is left to the flusher, which runs after the goroutines ready at the
// time: the frames written in one scheduling round (the answers of
// several streams, a HEADERS and its DATA) leave in one TLS record and one
// system call, as an event loop writes after handling its batch.
func (c *conn) write(fn func() error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	err := c.werr
	if err == nil {
		// A write blocked on a client that does not read ends at the
		// deadline; it is moved on when half of it has passed.
		if now := time.Now(); c.wdl.Sub(now) < c.cfg.WriteTimeout/2 {
			c.wdl = now.Add(c.cfg.WriteTimeout)
			_ = c.nc.SetWriteDeadline(c.wdl)
		}
	}
	if err == nil {
		err = fn()
	}
	if err == nil && !c.pending && c.bw.Buffered() > 0 {
		c.pending = true
		select {
		case c.flushNow <- struct{}{}:
		default:
		}
	}
	c.failLocked(err)
	return err
}

// failLocked records the first write error and ends the reader (c.wmu
// held).
func (c *conn) failLocked(err error) {
	if err != nil && c.werr == nil {
		c.werr = err
		_ = c.nc.SetReadDeadline(time.Now())
	}
}

// flusher flushes what the writers left once the goroutines ready at the
// time have run.
func (c *conn) flusher() {
	defer close(c.flushDone)
	for {
		select {
		case <-c.flushNow:
		case <-c.stopWork:
			return
		}
		runtime.Gosched()
		c.flushSync()
	}
}

// flushSync flushes at once (a GOAWAY before the connection ends).
func (c *conn) flushSync() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.pending = false
	if c.werr == nil && c.bw.Buffered() > 0 {
		c.failLocked(c.bw.Flush())
	}
}

// worker runs st's handler, then waits for the next stream of the
// connection until it ends.
func (c *conn) worker(st *Stream) {
	for {
		c.run(st)
		select {
		case st = <-c.work:
		case <-c.stopWork:
			return
		}
	}
}

// run runs the handler of st and ends what it left open.
func (c *conn) run(st *Stream) {
	defer func() {
		c.mu.Lock()
		c.handlers--
		local, closed := st.localDone, st.err != nil
		c.mu.Unlock()
		switch {
		case closed:
		case !local:
			_ = st.Reset(http2.ErrCodeInternal)
		default:
			c.mu.Lock()
			remote := st.remoteDone
			c.mu.Unlock()
			if !remote { // the answer ended before the request: stop its body
				_ = st.Reset(http2.ErrCodeNo)
			}
		}
		st.cancel()
		// Return the credit of body bytes never read.
		c.mu.Lock()
		n := int64(len(st.body)) + st.unacked
		st.body = nil
		st.unacked = 0
		c.connUnacked += n
		ack := c.connUnacked
		if ack > 0 && !c.closed {
			c.connUnacked = 0
			c.connRecv += ack
		}
		c.mu.Unlock()
		if ack > 0 {
			_ = c.write(func() error { return c.fr.WriteWindowUpdate(0, uint32(ack)) })
		}
	}()
	c.serveStream(st)
}

// serveStream runs the handler; a panic resets the stream and is logged,
// except http.ErrAbortHandler (a handler's way to abort an answer, as a
// reverse proxy does when the upstream body fails), as net/http does.
func (c *conn) serveStream(st *Stream) {
	defer func() {
		if v := recover(); v != nil {
			if v != http.ErrAbortHandler {
				buf := make([]byte, 64<<10)
				c.cfg.Log.Error("h2: handler panic", "panic", fmt.Sprint(v), "stack", string(buf[:runtime.Stack(buf, false)]))
			}
			_ = st.Reset(http2.ErrCodeInternal)
		}
	}()
	c.h.ServeH2(st)
}
