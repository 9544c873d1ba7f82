package h2

import (
	"context"
	"io"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Stream is one request and its answer. The request fields are set
// before the handler runs and not changed after; the methods may be
// called from the handler's goroutine only (Read included), except
// Context and SetAbort.
type Stream struct {
	c  *conn
	id uint32

	// The request: pseudo-header fields, the regular fields in their
	// order (names in lower case, checked by the Framer), the declared
	// length (-1: none), whether the header list was cut at
	// MaxHeaderListSize (the handler answers 431).
	Method, Scheme, Authority, Path, Protocol string
	Header                                    []hpack.HeaderField
	ContentLength                             int64
	TooLarge                                  bool

	ctx    context.Context
	cancel context.CancelFunc
	wake   chan struct{} // signalled on any change below

	// Under c.mu.
	body       []byte // received, not yet read
	received   int64
	recvWindow int64 // what the client may still send
	unacked    int64 // read (or padding) not yet returned to the client
	trailer    []hpack.HeaderField
	remoteDone bool // END_STREAM received
	localDone  bool // END_STREAM sent
	sendWindow int64
	err        error     // reset or the connection ended
	abort      io.Closer // closed when the stream is reset

	wroteHeaders bool // handler goroutine only
}

func (s *Stream) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Context ends when the stream is reset or its connection ends.
func (s *Stream) Context() context.Context { return s.ctx }

// SetAbort registers what to close when the stream is reset (the
// upstream connection of the exchange); nil clears it. When the stream is
// already reset, c is closed at once.
func (s *Stream) SetAbort(c io.Closer) {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if c != nil && s.err != nil {
		_ = c.Close()
		return
	}
	s.abort = c
}

// EndedRequest reports whether the request had no body (END_STREAM on
// its HEADERS).
func (s *Stream) EndedRequest() bool {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.remoteDone && s.received == 0 && len(s.body) == 0
}

// Read reads the request body; io.EOF after its end. Reading returns
// flow-control credit to the client.
func (s *Stream) Read(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	for len(s.body) == 0 {
		switch {
		case s.err != nil:
			err := s.err
			c.mu.Unlock()
			return 0, err
		case s.remoteDone:
			c.mu.Unlock()
			return 0, io.EOF
		}
		c.mu.Unlock()
		select {
		case <-s.wake:
		case <-s.ctx.Done():
		}
		c.mu.Lock()
	}
	n := copy(p, s.body)
	s.body = s.body[n:]
	if len(s.body) == 0 {
		s.body = s.body[:0:0]
	}
	c.mu.Unlock()
	return n, s.ack(int64(n))
}

// ack returns n consumed bytes of credit, in batches of half a window.
func (s *Stream) ack(n int64) error {
	c := s.c
	c.mu.Lock()
	s.unacked += n
	c.connUnacked += n
	var streamInc, connInc int64
	if s.unacked >= int64(c.cfg.StreamWindow)/2 && !s.remoteDone && s.err == nil {
		streamInc, s.unacked = s.unacked, 0
		s.recvWindow += streamInc
	}
	if c.connUnacked >= int64(c.cfg.ConnWindow)/2 {
		connInc, c.connUnacked = c.connUnacked, 0
		c.connRecv += connInc
	}
	c.mu.Unlock()
	if streamInc == 0 && connInc == 0 {
		return nil
	}
	return c.write(func() error {
		if streamInc > 0 {
			if err := c.fr.WriteWindowUpdate(s.id, uint32(streamInc)); err != nil {
				return err
			}
		}
		if connInc > 0 {
			return c.fr.WriteWindowUpdate(0, uint32(connInc))
		}
		return nil
	})
}

// ackRecv returns padding credit at once.
func (c *conn) ackRecv(st *Stream) error { return st.ack(0) }

// Trailer is the request's trailer fields, once Read returned io.EOF.
func (s *Stream) Trailer() []hpack.HeaderField {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.trailer
}

// WriteHeaders sends the response head (a status below 200 is an
// informational answer, and more may follow); end ends the stream with
// it. fields' names must be lower case.
func (s *Stream) WriteHeaders(status int, fields []hpack.HeaderField, end bool) error {
	if err := s.check(); err != nil {
		return err
	}
	if status >= 200 {
		s.wroteHeaders = true
	}
	return s.writeBlock(func(e *hpack.Encoder) {
		var st [3]byte
		e.WriteField(hpack.HeaderField{Name: ":status", Value: statusText(status, st[:])})
		for _, f := range fields {
			e.WriteField(f)
		}
	}, end)
}

// WriteTrailers ends the stream with trailer fields.
func (s *Stream) WriteTrailers(fields []hpack.HeaderField) error {
	if err := s.check(); err != nil {
		return err
	}
	return s.writeBlock(func(e *hpack.Encoder) {
		for _, f := range fields {
			e.WriteField(f)
		}
	}, true)
}

func statusText(code int, b []byte) string {
	if code < 100 || code > 999 {
		code = 500
	}
	b[0], b[1], b[2] = byte('0'+code/100), byte('0'+code/10%10), byte('0'+code%10)
	switch code {
	case 200:
		return "200"
	case 404:
		return "404"
	}
	return string(b)
}

func (s *Stream) check() error {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	if s.localDone {
		return errEnded
	}
	return nil
}

// writeBlock encodes a header block and writes it as HEADERS and
// CONTINUATION frames of the client's maximum frame size.
func (s *Stream) writeBlock(encode func(*hpack.Encoder), end bool) error {
	c := s.c
	if end {
		s.endLocal()
	}
	c.mu.Lock()
	maxFrame := int(c.peerMaxFrame)
	c.mu.Unlock()
	return c.write(func() error {
		c.hbuf.Reset()
		encode(c.henc)
		block := c.hbuf.Bytes()
		first := true
		for first || len(block) > 0 {
			frag := block
			if len(frag) > maxFrame {
				frag = frag[:maxFrame]
			}
			block = block[len(frag):]
			var err error
			if first {
				err = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: s.id, BlockFragment: frag, EndStream: end, EndHeaders: len(block) == 0})
				first = false
			} else {
				err = c.fr.WriteContinuation(s.id, len(block) == 0, frag)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// endLocal records that the server ended the stream.
func (s *Stream) endLocal() {
	c := s.c
	c.mu.Lock()
	s.localDone = true
	c.maybeForgetLocked(s)
	c.mu.Unlock()
}

type streamErr string

func (e streamErr) Error() string { return string(e) }

const errEnded = streamErr("h2: write after the end of the stream")

// MaxData is the largest DATA payload Write sends at once.
func (s *Stream) MaxData() int {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return int(s.c.peerMaxFrame)
}

// Write sends p as DATA frames, waiting for flow-control credit; end
// ends the stream with the last one. A stream that waits longer than
// StallTimeout is reset.
func (s *Stream) Write(p []byte, end bool) error {
	c := s.c
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		c.mu.Lock()
		if s.err != nil {
			err := s.err
			c.mu.Unlock()
			return err
		}
		if s.localDone {
			c.mu.Unlock()
			return errEnded
		}
		n := min(int64(len(p)), s.sendWindow, c.peerWindow, int64(c.peerMaxFrame))
		if n <= 0 && len(p) > 0 {
			c.mu.Unlock()
			if timer == nil {
				timer = time.NewTimer(c.cfg.StallTimeout)
			}
			select {
			case <-s.wake:
				continue
			case <-s.ctx.Done():
				continue
			case <-timer.C:
				_ = s.Reset(http2.ErrCodeFlowControl)
				c.mu.Lock()
				s.err = errStalled
				c.mu.Unlock()
				return errStalled
			}
		}
		if n < 0 {
			n = 0
		}
		s.sendWindow -= n
		c.peerWindow -= n
		last := end && int(n) == len(p)
		if last {
			s.localDone = true
			c.maybeForgetLocked(s)
		}
		c.mu.Unlock()
		chunk := p[:n]
		p = p[n:]
		if err := c.write(func() error { return c.fr.WriteData(s.id, last, chunk) }); err != nil {
			return err
		}
		if len(p) == 0 {
			return nil
		}
		if timer != nil {
			timer.Reset(c.cfg.StallTimeout)
		}
	}
}

// Reset ends the stream with RST_STREAM and code.
func (s *Stream) Reset(code http2.ErrCode) error {
	c := s.c
	c.mu.Lock()
	if s.err != nil {
		c.mu.Unlock()
		return nil
	}
	s.localDone = true
	c.closeStreamLocked(s, errReset)
	c.mu.Unlock()
	return c.write(func() error { return c.fr.WriteRSTStream(s.id, code) })
}
