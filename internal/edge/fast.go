package edge

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeitwork/zeitwork/internal/edge/h1"
	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// exchange is one request on the fast path and the connection it came on.
type exchange struct {
	req      h1.Request
	host     string // lower case, without port
	route    *routetable.Route
	instance *routetable.Instance // the first choice
	client   string
	tls      *tls.ConnectionState
	conn     net.Conn
	br       *bufio.Reader // reads src
	src      clientSrc
	bw       *bufio.Writer // to the client, during the exchange
	start    time.Time
	draining func() bool
	id       []byte // the request id, once known: the client's or idBuf
	idBuf    [24]byte
	rawHost  string // the Host host was made from

	// The client watch (see watchClient).
	wmu     sync.Mutex
	wtimer  *time.Timer
	wactive bool          // an exchange is in progress
	wdone   chan struct{} // the watcher is running
	gone    bool          // the client went away during the exchange
	up      net.Conn      // the exchange's current upstream connection
}

// watchAfter is how long an exchange runs before the fast path starts
// watching its client: a client that goes away while its request waits
// for the app (a long poll) or while a stream is silent then frees the
// upstream connection at once, as net/http's background read does — but
// only exchanges that last pay for it.
const watchAfter = time.Second

// clientSrc is what a connection's read buffer reads: the connection,
// after the byte the client watch may have taken from it.
type clientSrc struct {
	conn    net.Conn
	pending [1]byte
	has     bool
}

func (s *clientSrc) Read(p []byte) (int, error) {
	if s.has && len(p) > 0 {
		p[0], s.has = s.pending[0], false
		return 1, nil
	}
	return s.conn.Read(p)
}

// beginWatch arms the client watch for a new exchange.
func (x *exchange) beginWatch() {
	x.wmu.Lock()
	x.wactive, x.gone, x.up = true, false, nil
	x.wmu.Unlock()
	if x.wtimer == nil {
		x.wtimer = time.AfterFunc(watchAfter, x.watchClient)
	} else {
		x.wtimer.Reset(watchAfter)
	}
}

// endWatch disarms the watch and, when it ran, stops it and waits for it.
func (x *exchange) endWatch() {
	x.wtimer.Stop()
	x.wmu.Lock()
	x.wactive = false
	done := x.wdone
	x.wdone = nil
	x.wmu.Unlock()
	if done != nil {
		_ = x.conn.SetReadDeadline(time.Unix(1, 0))
		<-done
		_ = x.conn.SetReadDeadline(time.Time{})
	}
}

// watchClient runs once an exchange has lasted watchAfter: it waits for
// the client. Bytes (a pipelined request) mean the client is there, and
// are kept for the next read; the end of the connection means it is gone,
// and the exchange's upstream connection is closed, which ends the
// exchange. Reading the connection here is safe: during an exchange
// nothing else reads it, and the read buffer is not touched (the parsed
// request lives in it).
func (x *exchange) watchClient() {
	x.wmu.Lock()
	if !x.wactive || x.wdone != nil {
		x.wmu.Unlock()
		return
	}
	done := make(chan struct{})
	x.wdone = done
	x.wmu.Unlock()
	defer close(done)
	n, err := x.conn.Read(x.src.pending[:])
	if n == 1 {
		x.src.has = true
		return
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return // endWatch
	}
	x.wmu.Lock()
	if x.wactive {
		x.gone = true
		if x.up != nil {
			_ = x.up.Close()
		}
	}
	x.wmu.Unlock()
}

// setUpstream records the exchange's current upstream connection, closing
// it at once when the client is already gone.
func (x *exchange) setUpstream(c net.Conn) {
	x.wmu.Lock()
	x.up = c
	if x.gone {
		_ = c.Close()
	}
	x.wmu.Unlock()
}

func (x *exchange) clientGone() bool {
	x.wmu.Lock()
	defer x.wmu.Unlock()
	return x.gone
}

// serveFast proxies x's request and writes the answer, as ServeHTTP and
// the reverse proxy would for the same request: the same rate limit, the
// same forwarding headers, one retry on another instance when the first
// one cannot be reached or its node agent answers 502/503, the same
// ejection, error pages, metrics and access log. It reports whether the
// connection can carry another request.
func (p *Proxy) serveFast(x *exchange) bool {
	class := p.hostClass(x.route)
	cm := p.classMetrics(class)
	p.m.fast.Inc()
	x.beginWatch()
	code, keep := p.fastExchange(x)
	x.endWatch()
	cm.count(p, code, class)
	took := time.Since(x.start)
	cm.latency.Observe(took.Seconds())
	if p.cfg.AccessLog {
		path := x.req.Target
		if i := bytes.IndexByte(path, '?'); i >= 0 {
			path = path[:i]
		}
		p.log.Info("request", "host", x.host, "method", string(x.req.Method), "path", string(path), "status", code,
			"client", x.client, "duration_ms", took.Milliseconds(), "request_id", string(x.id))
	}
	return keep
}

// clientReqID is the client's X-Request-Id when it is usable (the first
// one, as Header.Get), else nil.
func (x *exchange) clientReqID() []byte {
	for _, h := range x.req.Headers {
		if h.Kind == h1.XRequestID {
			if len(h.Value) > 0 && len(h.Value) <= 200 {
				return h.Value
			}
			break
		}
	}
	return nil
}

func (p *Proxy) fastExchange(x *exchange) (code int, keep bool) {
	x.id = nil
	if p.limiter != nil {
		if ok, wait := p.limiter.Allow(x.client, x.start); !ok {
			p.m.limited.Inc()
			return 429, x.answer(429, "429 Too Many Requests: slow down\n", "Retry-After", strconv.Itoa(int(wait/time.Second)+1), nil)
		}
	}
	reqID := x.clientReqID()
	if reqID == nil {
		putRequestID(&x.idBuf)
		reqID = x.idBuf[:]
	}
	x.id = reqID
	in := x.instance
	var tried []string
	var uc *upConn
	for attempt := 0; ; attempt++ {
		s := p.stateOf(in.ID)
		s.outstanding.Add(1)
		var err error
		uc, err = p.fastRoundTrip(x, in, reqID)
		s.outstanding.Add(-1)
		if x.clientGone() {
			if uc != nil {
				_ = uc.conn.Close()
			}
			return 499, false // the client's doing, not the instance's
		}
		if err == nil && p.attemptDone(s, uc.resp.Status) {
			break
		}
		p.attemptFailed(s)
		tried = append(tried, in.ID)
		var next *routetable.Instance
		if attempt < maxRetries {
			next = p.pick(x.route, tried)
		}
		if next == nil {
			if err != nil {
				p.m.proxyErr.Inc()
				return 502, x.answer(502, "502 Bad Gateway: the app did not answer\n", "Retry-After", "1", reqID)
			}
			break // pass the node agent's 502/503 on
		}
		if uc != nil {
			_ = uc.conn.Close()
		}
		in = next
	}
	status := uc.resp.Status // uc may be another exchange's once forward returned it to the pool
	keep, ok := p.forward(x, uc, reqID)
	switch {
	case x.clientGone():
		return 499, false
	case !ok:
		return status, false
	}
	return status, keep
}

// fastRoundTrip sends x's request to instance in over a pooled connection
// and reads the response head into uc.resp. A pooled connection that
// fails before any byte of the answer (closed by the node agent while
// idle) is replaced by a fresh one once.
func (p *Proxy) fastRoundTrip(x *exchange, in *routetable.Instance, reqID []byte) (*upConn, error) {
	key, err := nodeKey(in.NodeAddress)
	if err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		var uc *upConn
		if attempt == 0 {
			uc = p.up.get(key)
		}
		if uc == nil {
			if uc, err = p.up.dial(context.Background(), key); err != nil {
				return nil, err
			}
		}
		x.setUpstream(uc.conn)
		err := p.send(x, uc, in, reqID)
		if err == nil {
			return uc, nil
		}
		_ = uc.conn.Close()
		if attempt == 0 && uc.reused && uc.cr.n == 0 && err != errNodeGone {
			continue
		}
		return nil, err
	}
}

// send writes the request on uc and reads the final response head;
// informational answers (103 Early Hints) go to the client as they come.
func (p *Proxy) send(x *exchange, uc *upConn, in *routetable.Instance, reqID []byte) error {
	uc.cr.n = 0
	w := uc.bw
	r := &x.req
	w.Write(r.Method)
	w.WriteByte(' ')
	w.Write(r.Target)
	w.WriteString(" HTTP/1.1\r\nHost: ")
	w.Write(r.Host)
	w.WriteString("\r\n")
	var xff [][]byte
	for _, h := range r.Headers {
		switch h.Kind {
		case h1.XForwardedFor:
			xff = append(xff, h.Value)
			continue
		case h1.Host, h1.Connection, h1.HopByHop, h1.Trailer, h1.Forwarded, h1.XForwardedHost, h1.XForwardedProto, h1.XRealIP, h1.XRequestID, h1.Internal:
			continue
		}
		w.Write(h.Name)
		w.WriteString(": ")
		w.Write(h.Value)
		w.WriteString("\r\n")
	}
	// As httputil.ProxyRequest.SetXForwarded: the client appended to the
	// X-Forwarded-For it sent; host and protocol as the client used them.
	w.WriteString("X-Forwarded-For: ")
	for _, v := range xff {
		w.Write(v)
		w.WriteString(", ")
	}
	w.WriteString(x.client)
	w.WriteString("\r\nX-Forwarded-Host: ")
	w.Write(r.Host)
	if x.tls != nil {
		w.WriteString("\r\nX-Forwarded-Proto: https\r\nX-Real-Ip: ")
	} else {
		w.WriteString("\r\nX-Forwarded-Proto: http\r\nX-Real-Ip: ")
	}
	w.WriteString(x.client)
	w.WriteString("\r\nX-Request-Id: ")
	w.Write(reqID)
	w.WriteString("\r\nX-Zeitwork-Instance: ")
	w.WriteString(in.ID)
	w.WriteString("\r\nX-Zeitwork-Token: ")
	w.WriteString(p.cfg.ClusterToken)
	w.WriteString("\r\n\r\n")
	if err := w.Flush(); err != nil {
		return err
	}
	// See upstream.roundTrip: let other ready goroutines run while the
	// node agent answers.
	runtime.Gosched()
	if err := p.up.awaitAnswer(uc); err != nil {
		return err
	}
	for n1xx := 0; ; n1xx++ {
		n, err := readResponseHead(uc)
		if err != nil {
			return err
		}
		st := uc.resp.Status
		if st >= 200 {
			uc.headLen = n
			return nil
		}
		if st == http.StatusSwitchingProtocols || n1xx >= 5 {
			return h1.ErrMalformed // no upgrade was asked for
		}
		head, _ := uc.br.Peek(n)
		if _, err := x.bw.Write(head); err != nil {
			return err
		}
		if err := x.bw.Flush(); err != nil {
			return err
		}
		_, _ = uc.br.Discard(n)
	}
}

// maxFastResponseHead bounds a response head on the fast path.
const maxFastResponseHead = 1 << 20

// readResponseHead reads until uc.br holds a whole response head, growing
// the buffer for large heads, and parses it into uc.resp.
func readResponseHead(uc *upConn) (int, error) {
	for {
		b, _ := uc.br.Peek(uc.br.Buffered())
		n, err := h1.ParseResponse(b, &uc.resp)
		if !errors.Is(err, h1.ErrIncomplete) {
			return n, err
		}
		if len(b) == uc.br.Size() {
			if len(b) >= maxFastResponseHead {
				return 0, errHeadTooLarge
			}
			pending := bytes.Clone(b)
			uc.br = bufio.NewReaderSize(io.MultiReader(bytes.NewReader(pending), &uc.cr), 2*len(b))
			continue
		}
		if _, err := uc.br.Peek(len(b) + 1); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
	}
}

// forward writes the response head and body read on uc to the client and
// returns uc to the pool when the exchange ended cleanly. keep: the client
// connection can carry another request; ok: nothing failed.
func (p *Proxy) forward(x *exchange, uc *upConn, reqID []byte) (keep, ok bool) {
	r := &uc.resp
	bodyless := r.BodyLess(string(x.req.Method) == http.MethodHead)
	closeDelimited := !bodyless && !r.Chunked && r.Length < 0
	closeClient := x.req.Close || closeDelimited || x.draining()
	w := x.bw
	writeStatusLine(w, r.Status, r.Reason)
	w.WriteString("X-Request-Id: ")
	w.Write(reqID)
	w.WriteString("\r\n")
	if x.tls != nil && x.route.Kind == "custom" {
		w.WriteString("Strict-Transport-Security: max-age=31536000\r\n")
	}
	dated := false
	for _, h := range r.Headers {
		switch h.Kind {
		case h1.HopByHop:
			continue
		case h1.Trailer: // the chunked body, trailers included, passes as is
			if !r.Chunked || bodyless {
				continue
			}
		case h1.Date:
			dated = true
		}
		w.Write(h.Name)
		w.WriteString(": ")
		w.Write(h.Value)
		w.WriteString("\r\n")
	}
	if !dated {
		w.WriteString("Date: ")
		w.Write(httpDate(time.Now()))
		w.WriteString("\r\n")
	}
	if r.Length >= 0 {
		w.WriteString("Content-Length: ")
		writeInt(w, r.Length)
		w.WriteString("\r\n")
	} else if r.Chunked && !bodyless {
		w.WriteString("Transfer-Encoding: chunked\r\n")
	}
	if closeClient {
		w.WriteString("Connection: close\r\n")
	}
	w.WriteString("\r\n")
	_, _ = uc.br.Discard(uc.headLen)
	var err error
	switch {
	case bodyless:
	case !r.Chunked && r.Length >= 0 && int64(uc.br.Buffered()) >= r.Length: // all read with the head
		_, err = h1.ForwardBody(w, uc.br, r.Length, false, w, nil)
	default:
		buf := bufs.Get().(*[]byte)
		_, err = h1.ForwardBody(w, uc.br, r.Length, r.Chunked, w, *buf)
		bufs.Put(buf)
	}
	if err == nil {
		err = w.Flush()
	}
	if err != nil || r.Close || closeDelimited || uc.br.Buffered() > 0 {
		_ = uc.conn.Close()
	} else {
		p.up.put(uc)
	}
	return !closeClient, err == nil
}

// answer writes a short plain-text answer of the edge's own (as
// http.Error does), with one extra header and the request id when given.
func (x *exchange) answer(code int, body, hk, hv string, reqID []byte) bool {
	keep := !x.req.Close && !x.draining()
	w := x.bw
	writeStatusLine(w, code, nil)
	w.WriteString("Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n")
	w.WriteString(hk)
	w.WriteString(": ")
	w.WriteString(hv)
	w.WriteString("\r\n")
	if reqID != nil {
		w.WriteString("X-Request-Id: ")
		w.Write(reqID)
		w.WriteString("\r\n")
	}
	w.WriteString("Date: ")
	w.Write(httpDate(time.Now()))
	w.WriteString("\r\nContent-Length: ")
	writeInt(w, int64(len(body)))
	if !keep {
		w.WriteString("\r\nConnection: close")
	}
	w.WriteString("\r\n\r\n")
	if string(x.req.Method) != http.MethodHead {
		w.WriteString(body)
	}
	return w.Flush() == nil && keep
}

// writeStatusLine writes "HTTP/1.1 <code> <reason>\r\n": the node
// agent's reason when it gave one, else the standard text.
func writeStatusLine(w *bufio.Writer, code int, reason []byte) {
	w.WriteString("HTTP/1.1 ")
	writeInt(w, int64(code))
	w.WriteByte(' ')
	switch {
	case len(reason) > 0:
		w.Write(reason)
	case http.StatusText(code) != "":
		w.WriteString(http.StatusText(code))
	default:
		w.WriteString("status code ")
		writeInt(w, int64(code))
	}
	w.WriteString("\r\n")
}

// writeInt writes v in decimal, formatted in w's own buffer.
func writeInt(w *bufio.Writer, v int64) {
	w.Write(strconv.AppendInt(w.AvailableBuffer(), v, 10))
}

// httpDate is now in the HTTP date format, formatted once per second.
func httpDate(now time.Time) []byte {
	sec := now.Unix()
	if d := cachedDate.Load(); d != nil && d.sec == sec {
		return d.text
	}
	d := &dateText{sec: sec, text: now.UTC().AppendFormat(nil, http.TimeFormat)}
	d.str = string(d.text)
	cachedDate.Store(d)
	return d.text
}

// httpDateString is httpDate as a string, made once per second.
func httpDateString(now time.Time) string {
	if d := cachedDate.Load(); d != nil && d.sec == now.Unix() {
		return d.str
	}
	httpDate(now)
	return cachedDate.Load().str
}

type dateText struct {
	sec  int64
	text []byte
	str  string
}

var cachedDate atomic.Pointer[dateText]

var nodeKeys sync.Map // node address → host:port

// nodeKey is the host:port of a node agent address (http://host[:port]).
func nodeKey(addr string) (string, error) {
	if k, ok := nodeKeys.Load(addr); ok {
		return k.(string), nil
	}
	u, err := nodeURL(addr)
	if err != nil {
		return "", err
	}
	if u.Scheme != "http" || u.Host == "" {
		return "", errors.New("edge: node address " + strconv.Quote(addr) + " is not http://host[:port]")
	}
	key := hostPort(u)
	nodeKeys.Store(addr, key)
	return key, nil
}
