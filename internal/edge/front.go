package edge

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeitwork/zeitwork/internal/edge/h1"
	"github.com/zeitwork/zeitwork/internal/edge/h2"
	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// front serves one port. It accepts connections, completes the TLS
// handshake on the HTTPS port, and serves plain HTTP/1.1 requests itself
// (Proxy.serveFast): a request line, a head parsed in place, the request
// written to the node agent and the answer copied back, with no per-request
// goroutines, header maps or request objects; HTTP/2 connections are
// served by internal/edge/h2 (serveH2). Everything else goes to
// net/http, unchanged: an HTTP/1.1 connection from
// the first request the fast path does not serve (h1.ParseRequest's
// ErrNotPlain, an unknown host, no healthy instance, a head larger than the
// read buffer) — that connection, with the bytes already read, belongs to
// net/http from then on.
type front struct {
	p      *Proxy
	tlsCfg *tls.Config  // nil on the plain-HTTP port
	srv    *http.Server // takes the connections handed off
	// fast reports whether the fast path serves a request for route with
	// this target (the plain port leaves ACME challenges and redirects
	// to net/http).
	fast              func(route *routetable.Route, target []byte) bool
	idleTimeout       time.Duration
	readHeaderTimeout time.Duration
	log               *slog.Logger

	handoff *connQueue
	// h2cfg bounds the HTTP/2 connections; shutdown is closed when the
	// drain starts (they send GOAWAY and end after their streams).
	h2cfg    h2.Config
	shutdown chan struct{}

	mu      sync.Mutex
	conns   map[*frontConn]struct{}
	closing atomic.Bool    // set under mu (track reads it under mu too)
	wg      sync.WaitGroup // connection goroutines
}

// frontConn is one connection while the front owns it.
type frontConn struct {
	raw  net.Conn
	idle atomic.Bool // waiting for a request (or in its TLS handshake)
}

func newFront(p *Proxy, tlsCfg *tls.Config, srv *http.Server, fast func(*routetable.Route, []byte) bool, log *slog.Logger) *front {
	f := &front{p: p, tlsCfg: tlsCfg, srv: srv, fast: fast, log: log, conns: map[*frontConn]struct{}{},
		idleTimeout: srv.IdleTimeout, readHeaderTimeout: srv.ReadHeaderTimeout, shutdown: make(chan struct{})}
	if f.idleTimeout <= 0 {
		f.idleTimeout = 120 * time.Second
	}
	if f.readHeaderTimeout <= 0 {
		f.readHeaderTimeout = 10 * time.Second
	}
	// net/http learns a handed-off connection's TLS state from its
	// context (it only sees a net.Conn); see tlsState.
	inner := srv.ConnContext
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if inner != nil {
			ctx = inner(ctx, c)
		}
		if hc, ok := c.(*handoffConn); ok && hc.tls != nil {
			ctx = context.WithValue(ctx, tlsStateKey{}, hc.tls)
		}
		return ctx
	}
	return f
}

type tlsStateKey struct{}

// tlsState gives a request on a connection handed off after its TLS
// handshake its TLS state back.
func tlsState(r *http.Request) {
	if r.TLS == nil {
		if cs, ok := r.Context().Value(tlsStateKey{}).(*tls.ConnectionState); ok {
			r.TLS = cs
		}
	}
}

// serve accepts on ln until ctx ends, then stops accepting and drains:
// idle connections close at once, busy ones after their current response,
// and whatever is left when drain runs out is closed.
func (f *front) serve(ctx context.Context, ln net.Listener, drain time.Duration) error {
	f.handoff = newConnQueue(ln.Addr())
	srvDone := make(chan error, 1)
	go func() { srvDone <- f.srv.Serve(f.handoff) }() // ends with Shutdown or Close below
	acceptDone := make(chan error, 1)
	go func() { acceptDone <- f.accept(ln) }() // ends when ln is closed
	var err error
	select {
	case <-ctx.Done():
	case err = <-acceptDone:
		acceptDone <- err
	}
	_ = ln.Close()
	<-acceptDone

	sctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- f.srv.Shutdown(sctx) }() // bounded by sctx
	f.drain(sctx)
	if serr := <-shut; errors.Is(serr, context.DeadlineExceeded) {
		f.log.Warn("drain timeout reached; closing remaining connections", "addr", ln.Addr().String())
		_ = f.srv.Close()
	}
	f.wg.Wait()
	<-srvDone
	return err
}

// accept runs the accept loop, backing off on temporary errors as
// net/http does.
func (f *front) accept(ln net.Listener) error {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of descriptors or another transient failure.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			f.log.Warn("accept failed; backing off", "err", err, "backoff", backoff.String())
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		fc := &frontConn{raw: c}
		fc.idle.Store(true)
		if !f.track(fc) {
			_ = c.Close()
			continue
		}
		f.wg.Go(func() {
			defer f.untrack(fc)
			f.handle(fc)
		})
	}
}

func (f *front) track(fc *frontConn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closing.Load() {
		return false
	}
	f.conns[fc] = struct{}{}
	return true
}

func (f *front) untrack(fc *frontConn) {
	f.mu.Lock()
	delete(f.conns, fc)
	f.mu.Unlock()
}

// setIdle marks fc as waiting for a request (or not); false when draining
// (the connection is to be closed instead). No lock on this per-request
// path: drain stores closing before it reads the idle flags, a connection
// stores its flag before it reads closing, so with sequentially consistent
// atomics an idle connection is either closed by drain or sees closing.
func (f *front) setIdle(fc *frontConn, idle bool) bool {
	fc.idle.Store(idle)
	return !f.closing.Load()
}

// drain closes idle connections now and waits for the busy ones until ctx
// ends, then closes those too.
func (f *front) drain(ctx context.Context) {
	f.mu.Lock()
	f.closing.Store(true)
	close(f.shutdown)
	for fc := range f.conns {
		if fc.idle.Load() {
			_ = fc.raw.Close()
		}
	}
	f.mu.Unlock()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		f.mu.Lock()
		n := len(f.conns)
		if n > 0 && ctx.Err() != nil {
			for fc := range f.conns {
				_ = fc.raw.Close()
			}
		}
		f.mu.Unlock()
		if n == 0 || ctx.Err() != nil {
			return
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
}

// handle runs one connection: the TLS handshake, then the fast path or
// net/http.
func (f *front) handle(fc *frontConn) {
	conn := fc.raw
	var cs *tls.ConnectionState
	if f.tlsCfg != nil {
		tc := tls.Server(conn, f.tlsCfg)
		_ = tc.SetDeadline(time.Now().Add(f.readHeaderTimeout))
		if err := tc.Handshake(); err != nil {
			f.log.Debug("TLS handshake failed", "peer", conn.RemoteAddr().String(), "err", err)
			_ = tc.Close()
			return
		}
		_ = tc.SetDeadline(time.Time{})
		st := tc.ConnectionState()
		switch st.NegotiatedProtocol {
		case "h2": // internal/edge/h2; busy for the drain until its GOAWAY ends it
			fc.idle.Store(false)
			f.serveH2(tc, &st)
			_ = tc.Close()
			return
		case "acme-tls/1": // the challenge was answered by the handshake
			_ = tc.Close()
			return
		}
		conn, cs = tc, &st
	}
	x := &exchange{client: clientHost(conn.RemoteAddr()), tls: cs, conn: conn, draining: f.closing.Load}
	x.src.conn = conn
	br := readers.Get().(*bufio.Reader)
	br.Reset(&x.src)
	x.br = br
	handedOff := false
	defer func() {
		if !handedOff {
			br.Reset(nil)
			readers.Put(br)
			_ = conn.Close()
		}
	}()
	for {
		if br.Buffered() == 0 {
			if !f.setIdle(fc, true) {
				return
			}
			_ = conn.SetReadDeadline(time.Now().Add(f.idleTimeout))
			_, err := br.Peek(1)
			if !f.setIdle(fc, false) || err != nil {
				return
			}
		}
		n, err := f.readHead(conn, br, &x.req)
		switch {
		case errors.Is(err, h1.ErrNotPlain):
		case err != nil:
			return // timeout, or the client went away mid-head
		default:
			if string(x.req.Host) != x.rawHost { // most connections name one host
				x.rawHost = string(x.req.Host)
				x.host = hostOf(x.rawHost)
			}
			x.route = f.p.routes.Table().Lookup(x.host)
			if x.route != nil && f.fast(x.route, x.req.Target) {
				x.instance = f.p.pick(x.route, nil)
			}
		}
		if err != nil || x.route == nil || x.instance == nil {
			_ = conn.SetReadDeadline(time.Time{})
			handedOff = true
			f.handOff(&handoffConn{Conn: conn, r: br, tls: cs})
			return
		}
		x.start = time.Now()
		// The writer is the exchange's only: an idle connection holds
		// just its read buffer.
		x.bw = writers.Get().(*bufio.Writer)
		x.bw.Reset(conn)
		keep := f.p.serveFast(x)
		x.bw.Reset(nil)
		writers.Put(x.bw)
		_, _ = br.Discard(n)
		x.route, x.instance = nil, nil
		if !keep {
			return
		}
	}
}

// readHead reads until br holds a whole request head and parses it: the
// head's length, or ErrNotPlain (also for a head larger than br's buffer,
// which net/http reads instead), or the read's error. The whole head must
// arrive within readHeaderTimeout of its first byte.
func (f *front) readHead(conn net.Conn, br *bufio.Reader, req *h1.Request) (int, error) {
	deadline := false
	for {
		b, _ := br.Peek(br.Buffered())
		n, err := h1.ParseRequest(b, req)
		if !errors.Is(err, h1.ErrIncomplete) {
			return n, err
		}
		if len(b) == br.Size() {
			return 0, h1.ErrNotPlain
		}
		if !deadline {
			_ = conn.SetReadDeadline(time.Now().Add(f.readHeaderTimeout))
			deadline = true
		}
		if _, err := br.Peek(len(b) + 1); err != nil {
			return 0, err
		}
	}
}

func (f *front) handOff(c net.Conn) {
	if !f.handoff.put(c) {
		_ = c.Close()
	}
}

var (
	readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4<<10) }}
	writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

// clientHost is the client's IP address as text.
func clientHost(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

// handoffConn is a connection given to net/http with what the front had
// already read from it still to be read, and its TLS state (net/http sees
// only a net.Conn).
type handoffConn struct {
	net.Conn
	r   *bufio.Reader
	tls *tls.ConnectionState
}

func (c *handoffConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// connQueue is the net.Listener net/http serves: it yields the
// connections the front hands off.
type connQueue struct {
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newConnQueue(addr net.Addr) *connQueue {
	return &connQueue{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

// put hands c to net/http; false once the queue is closed.
func (q *connQueue) put(c net.Conn) bool {
	select {
	case q.ch <- c:
		return true
	case <-q.done:
		return false
	}
}

func (q *connQueue) Accept() (net.Conn, error) {
	select {
	case c := <-q.ch:
		return c, nil
	case <-q.done:
		return nil, net.ErrClosed
	}
}

func (q *connQueue) Close() error {
	q.once.Do(func() { close(q.done) })
	return nil
}

func (q *connQueue) Addr() net.Addr { return q.addr }
