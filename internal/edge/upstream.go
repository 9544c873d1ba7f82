package edge

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"net/url"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/zeitwork/zeitwork/internal/edge/h1"
)

// upstream is the HTTP/1.1 client for the data-plane hop (edge → node
// agent). For the common case — a bodiless, replayable request that is not
// an upgrade — it writes the request and reads the response on the
// caller's goroutine over a pooled keep-alive connection, instead of
// handing each request to http.Transport's per-connection read and write
// goroutines: with one CPU and GOMAXPROCS=1 those hand-offs (and the
// syscalls they add) dominate the proxy's cost. Everything else (request
// bodies, Expect: 100-continue, protocol upgrades, non-replayable methods)
// goes to the fallback http.Transport, unchanged.
//
// A connection goes back to the pool only when its response body was read
// to the end and neither side asked to close; one that fails before any
// byte of the response arrived (the node agent closed it while idle) is
// retried once on a fresh connection, which is safe because only replayable
// requests take this path.
type upstream struct {
	fallback *http.Transport // also dials the pooled connections
	// idleTimeout closes connections idle longer than this; maxIdle and
	// maxIdlePerHost bound the pool.
	idleTimeout             time.Duration
	maxIdle, maxIdlePerHost int

	// tryTimeout, when not 0, is how long a try waits for the first byte
	// of its answer before the node agent is checked (awaitAnswer);
	// connectTimeout bounds that check's dial.
	tryTimeout, connectTimeout time.Duration
	probes                     sync.Map // host:port → *probe

	mu      sync.Mutex
	idle    map[string][]*upConn // by host:port, most recently used last
	nIdle   int
	sweeper bool // a sweep is scheduled
}

func newUpstream(fallback *http.Transport, tryTimeout, connectTimeout time.Duration) *upstream {
	return &upstream{
		fallback:       fallback,
		idleTimeout:    fallback.IdleConnTimeout,
		maxIdle:        fallback.MaxIdleConns,
		maxIdlePerHost: fallback.MaxIdleConnsPerHost,
		tryTimeout:     tryTimeout,
		connectTimeout: connectTimeout,
		idle:           map[string][]*upConn{},
	}
}

// errNodeGone ends a try whose node agent neither answered within the try
// timeout nor accepts a new connection: its node is gone (down, or cut off
// with its region), and the request is retried on another instance.
var errNodeGone = errors.New("edge: no answer, and the node agent no longer accepts connections")

// awaitAnswer waits for the first byte of the node agent's answer on uc,
// for the tries of requests that are safe to repeat (every request that
// reaches it: the fast paths' and lean ones). Each tryTimeout without it,
// it checks that the node agent still accepts a connection: while it
// does, the app is just slow (a long poll) and the wait goes on
// unbounded; when it does not, errNodeGone. A node that is gone thus
// costs a try at most tryTimeout + connectTimeout, and a live app any
// time it likes to answer.
func (u *upstream) awaitAnswer(uc *upConn) error {
	if u.tryTimeout <= 0 || uc.br.Buffered() > 0 {
		return nil
	}
	for {
		_ = uc.conn.SetReadDeadline(time.Now().Add(u.tryTimeout))
		_, err := uc.br.Peek(1)
		if err == nil {
			_ = uc.conn.SetReadDeadline(time.Time{})
			return nil
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		if !u.nodeAlive(uc.key) {
			return errNodeGone
		}
	}
}

// probe is the last check of one node agent.
type probe struct {
	mu    sync.Mutex // held during the check: one at a time per node
	at    time.Time
	alive bool
}

// probeFresh is how long a check's result stands for the other tries
// that wait on the same node.
const probeFresh = time.Second

// nodeAlive reports whether the node agent at key accepts a TCP
// connection within connectTimeout.
func (u *upstream) nodeAlive(key string) bool {
	v, ok := u.probes.Load(key)
	if !ok {
		v, _ = u.probes.LoadOrStore(key, &probe{})
	}
	p := v.(*probe)
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Since(p.at) < probeFresh {
		return p.alive
	}
	c, err := net.DialTimeout("tcp", key, u.connectTimeout)
	if err == nil {
		c.Close()
	}
	p.at, p.alive = time.Now(), err == nil
	return p.alive
}

// upConn is one keep-alive connection to a node agent.
type upConn struct {
	key    string
	conn   net.Conn
	cr     countingReader
	br     *bufio.Reader
	bw     *bufio.Writer
	reused bool
	idleAt time.Time
	// resp and headLen are the fast path's response head (see fast.go).
	resp    h1.Response
	headLen int
}

// countingReader counts the bytes read from the connection, to tell a
// connection that died before answering from one that died mid-response,
// and bounds the response head (max, when not 0) as http.Transport does.
type countingReader struct {
	r   net.Conn
	n   int64
	max int64
}

// maxResponseHead is http.Transport's default MaxResponseHeaderBytes.
const maxResponseHead = 10 << 20

var errHeadTooLarge = errors.New("edge: the node agent's response head is too large")

func (c *countingReader) Read(p []byte) (int, error) {
	if c.max > 0 && c.n >= c.max {
		return 0, errHeadTooLarge
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// lean reports whether r can take the fast path: no body to stream (so it
// can be replayed), a replayable method, no upgrade and no 100-continue.
func lean(r *http.Request) bool {
	if r.URL.Scheme != "http" || (r.Body != nil && r.Body != http.NoBody) {
		return false
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
	default:
		return false
	}
	h := r.Header
	return len(h["Upgrade"]) == 0 && len(h["Expect"]) == 0 && len(r.Trailer) == 0
}

func (u *upstream) RoundTrip(r *http.Request) (*http.Response, error) {
	if !lean(r) {
		return u.fallback.RoundTrip(r)
	}
	key := hostPort(r.URL)
	ctx := r.Context()
	for attempt := 0; ; attempt++ {
		var uc *upConn
		if attempt == 0 {
			uc = u.get(key)
		}
		if uc == nil {
			var err error
			if uc, err = u.dial(ctx, key); err != nil {
				return nil, err
			}
		}
		resp, err := u.roundTrip(ctx, uc, r)
		if err == nil {
			return resp, nil
		}
		// A reused connection that failed before any byte of the
		// response: the node agent closed it while it sat idle. Replay
		// the request once on a fresh connection.
		if attempt == 0 && uc.reused && uc.cr.n == 0 && ctx.Err() == nil && err != errNodeGone {
			continue
		}
		return nil, err
	}
}

// hostPort is the address to dial for an http:// URL (port 80 when none).
func hostPort(u *url.URL) string {
	if u.Port() == "" {
		return net.JoinHostPort(u.Hostname(), "80")
	}
	return u.Host
}

func (u *upstream) dial(ctx context.Context, key string) (*upConn, error) {
	c, err := u.fallback.DialContext(ctx, "tcp", key)
	if err != nil {
		return nil, err
	}
	uc := &upConn{key: key, conn: c}
	uc.cr.r = c
	uc.br = bufio.NewReaderSize(&uc.cr, 4<<10)
	uc.bw = bufio.NewWriterSize(c, 4<<10)
	return uc, nil
}

// roundTrip sends r on uc and reads the response head. On error uc is
// closed.
func (u *upstream) roundTrip(ctx context.Context, uc *upConn, r *http.Request) (*http.Response, error) {
	// Abort a blocked write or read when the client goes away.
	stop := context.AfterFunc(ctx, func() { uc.conn.Close() })
	fail := func(err error) (*http.Response, error) {
		stop()
		uc.conn.Close()
		if cerr := ctx.Err(); cerr != nil {
			return nil, cerr
		}
		return nil, err
	}
	uc.cr.n = 0
	if !writeRequest(uc.bw, r) {
		if err := r.Write(uc.bw); err != nil {
			return fail(err)
		}
	}
	if err := uc.bw.Flush(); err != nil {
		return fail(err)
	}
	// The node agent needs a moment to answer. Let the other ready
	// goroutines run first instead of reading now: under load the answer
	// is then usually already there, which saves a read that would find
	// nothing (a system call) and a park and wake-up through the network
	// poller; when nothing else is ready this returns at once.
	runtime.Gosched()
	if err := u.awaitAnswer(uc); err != nil {
		return fail(err)
	}
	uc.cr.max = maxResponseHead
	var resp *http.Response
	for n1xx := 0; ; n1xx++ {
		var err error
		if resp, err = http.ReadResponse(uc.br, r); err != nil {
			return fail(err)
		}
		// Informational answers (103 Early Hints) are passed on through
		// the client trace, as http.Transport does; 101 ends the exchange.
		if resp.StatusCode < 100 || resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			break
		}
		if n1xx >= 5 {
			return fail(errors.New("edge: too many 1xx informational responses"))
		}
		if trace := httptrace.ContextClientTrace(ctx); trace != nil && trace.Got1xxResponse != nil {
			if err := trace.Got1xxResponse(resp.StatusCode, textproto.MIMEHeader(resp.Header)); err != nil {
				return fail(err)
			}
		}
	}
	uc.cr.max = 0
	reuse := !resp.Close && !r.Close && resp.StatusCode != http.StatusSwitchingProtocols
	if resp.Body == http.NoBody {
		u.release(uc, stop, reuse)
		return resp, nil
	}
	resp.Body = &upBody{u: u, ctx: ctx, uc: uc, body: resp.Body, stop: stop, reuse: reuse}
	return resp, nil
}

// writeRequest writes the head of a bodiless request as r.Write would, in
// one pass over the header map (no sorting, no transfer writer), and
// reports false, having written nothing, when r has anything unusual
// (r.Write then handles it): a host or URI needing cleaning, a header name
// or value with control characters, a length, Close.
func writeRequest(w *bufio.Writer, r *http.Request) bool {
	host := r.Host
	if host == "" {
		host = r.URL.Host
	}
	switch r.Method {
	case "", http.MethodPost, http.MethodPut, http.MethodPatch:
		return false
	}
	if !plainToken(host, true) || r.ContentLength != 0 || r.Close || r.URL.Opaque != "" {
		return false
	}
	uri := r.URL.RequestURI()
	for i := 0; i < len(uri); i++ {
		if c := uri[i]; c <= ' ' || c == 0x7f {
			return false
		}
	}
	h := r.Header
	for k, vv := range h {
		if !plainToken(k, false) {
			return false
		}
		for _, v := range vv {
			for i := 0; i < len(v); i++ {
				if c := v[i]; c < ' ' && c != '\t' || c == 0x7f {
					return false
				}
			}
		}
	}
	w.WriteString(r.Method)
	w.WriteByte(' ')
	w.WriteString(uri)
	w.WriteString(" HTTP/1.1\r\nHost: ")
	w.WriteString(host)
	w.WriteString("\r\n")
	ua, ok := h["User-Agent"]
	switch {
	case !ok:
		w.WriteString("User-Agent: Go-http-client/1.1\r\n")
	case len(ua) > 0 && ua[0] != "":
		w.WriteString("User-Agent: ")
		w.WriteString(textproto.TrimString(ua[0]))
		w.WriteString("\r\n")
	}
	// No Content-Length: r.Write sends "0" only for POST, PUT and PATCH,
	// which never come here.
	for k, vv := range h {
		switch k {
		case "Host", "User-Agent", "Content-Length", "Transfer-Encoding", "Trailer":
			continue
		}
		for _, v := range vv {
			w.WriteString(k)
			w.WriteString(": ")
			w.WriteString(textproto.TrimString(v))
			w.WriteString("\r\n")
		}
	}
	w.WriteString("\r\n")
	return true
}

// plainToken reports whether s is non-empty (unless host) and made only
// of bytes that need no escaping or cleaning in a request head: letters,
// digits and "-._~" (plus ":[]" in a host, for ports and IPv6).
func plainToken(s string, host bool) bool {
	if s == "" {
		return host
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '.', c == '_', c == '~':
		case host && (c == ':' || c == '[' || c == ']'):
		default:
			return false
		}
	}
	return true
}

// release ends an exchange on uc: back to the pool when the exchange
// completed cleanly, closed otherwise.
func (u *upstream) release(uc *upConn, stop func() bool, reuse bool) {
	if !stop() || !reuse || uc.br.Buffered() > 0 {
		uc.conn.Close()
		return
	}
	u.put(uc)
}

func (u *upstream) get(key string) *upConn {
	u.mu.Lock()
	defer u.mu.Unlock()
	for {
		list := u.idle[key]
		if len(list) == 0 {
			return nil
		}
		uc := list[len(list)-1]
		list[len(list)-1] = nil
		u.idle[key] = list[:len(list)-1]
		u.nIdle--
		if time.Since(uc.idleAt) > u.idleTimeout {
			uc.conn.Close()
			continue
		}
		uc.reused = true
		return uc
	}
}

func (u *upstream) put(uc *upConn) {
	uc.idleAt = time.Now()
	u.mu.Lock()
	defer u.mu.Unlock()
	list := u.idle[uc.key]
	if len(list) >= u.maxIdlePerHost || u.nIdle >= u.maxIdle {
		uc.conn.Close()
		return
	}
	u.idle[uc.key] = append(list, uc)
	u.nIdle++
	if !u.sweeper {
		u.sweeper = true
		time.AfterFunc(u.idleTimeout/2, u.sweep)
	}
}

// sweep closes connections idle for longer than idleTimeout.
func (u *upstream) sweep() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for key, list := range u.idle {
		// Oldest first: the list is ordered by the time it was put back.
		n := 0
		for n < len(list) && time.Since(list[n].idleAt) > u.idleTimeout {
			list[n].conn.Close()
			n++
		}
		if n > 0 {
			u.nIdle -= n
			list = append(list[:0], list[n:]...)
			clear(list[len(list):cap(list)])
		}
		if len(list) == 0 {
			delete(u.idle, key)
		} else {
			u.idle[key] = list
		}
	}
	u.sweeper = u.nIdle > 0
	if u.sweeper {
		time.AfterFunc(u.idleTimeout/2, u.sweep)
	}
}

// CloseIdleConnections closes every pooled connection.
func (u *upstream) CloseIdleConnections() {
	u.mu.Lock()
	for key, list := range u.idle {
		for _, uc := range list {
			uc.conn.Close()
		}
		delete(u.idle, key)
	}
	u.nIdle = 0
	u.mu.Unlock()
	u.fallback.CloseIdleConnections()
}

// upBody is a response body read from a pooled connection: its end
// returns the connection to the pool; closing it early, or a read error,
// closes the connection.
type upBody struct {
	u     *upstream
	ctx   context.Context
	uc    *upConn
	body  io.ReadCloser
	stop  func() bool
	reuse bool
	err   error // set once the exchange ended
}

func (b *upBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.body.Read(p)
	if err != nil {
		b.err = err
		if err == io.EOF {
			b.u.release(b.uc, b.stop, b.reuse)
		} else {
			b.stop()
			b.uc.conn.Close()
			if cerr := b.ctx.Err(); cerr != nil {
				b.err = cerr
			}
		}
		b.uc = nil
		return n, b.err
	}
	return n, nil
}

func (b *upBody) Close() error {
	if b.err == nil {
		// Not read to the end: the rest may never come (a stream), so the
		// connection cannot be reused.
		b.err = errBodyClosed
		b.stop()
		b.uc.conn.Close()
		b.uc = nil
	}
	return nil
}

var errBodyClosed = errors.New("edge: read on closed response body")
