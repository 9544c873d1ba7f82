package edge

import (
	"bufio"
	"crypto/tls"
	"io"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/zeitwork/zeitwork/internal/edge/h1"
	"github.com/zeitwork/zeitwork/internal/edge/h2"
	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// h2conn serves the streams of one HTTP/2 connection (internal/edge/h2).
// A bodiless GET, HEAD or OPTIONS for a routed host with a healthy
// instance takes the HTTP/2 fast path (serveH2Fast): it does what
// ServeHTTP and the reverse proxy do, over the pooled node-agent
// connections, without a Request, header maps or ReverseProxy. Every other
// stream becomes an http.Request for Proxy.ServeHTTP, the one
// implementation of bodies, trailers, 404/503/413 and the rest (docs/adr/0502).
type h2conn struct {
	p      *Proxy
	tls    *tls.ConnectionState
	client string                    // the client's IP address
	remote string                    // its address, for net/http's RemoteAddr
	last   atomic.Pointer[[2]string] // the last :authority and the host made from it
}

// serveH2 runs an HTTP/2 connection whose TLS handshake negotiated h2.
func (f *front) serveH2(tc *tls.Conn, cs *tls.ConnectionState) {
	h := &h2conn{p: f.p, tls: cs, client: clientHost(tc.RemoteAddr()), remote: tc.RemoteAddr().String()}
	cfg := f.h2cfg
	cfg.IdleTimeout, cfg.HandshakeTimeout, cfg.Log = f.idleTimeout, f.readHeaderTimeout, f.log
	h2.ServeConn(tc, cfg, h, f.shutdown)
}

func (h *h2conn) hostOf(authority string) string {
	if l := h.last.Load(); l != nil && l[0] == authority {
		return l[1]
	}
	host := hostOf(authority)
	h.last.Store(&[2]string{authority, host})
	return host
}

// ServeH2 serves one stream.
func (h *h2conn) ServeH2(s *h2.Stream) {
	start := time.Now()
	if (s.Method == http.MethodGet || s.Method == http.MethodHead || s.Method == http.MethodOptions) && !s.TooLarge &&
		s.EndedRequest() && h1.ValidTarget(s.Path) && h1.ValidHost(s.Authority) {
		host := h.hostOf(s.Authority)
		if route := h.p.routes.Table().Lookup(host); route != nil {
			if in := h.p.pick(route, nil); in != nil {
				h.p.serveH2Fast(h, s, route, in, host, start)
				return
			}
		}
	}
	h.serveHTTP(s)
}

// h2x is one stream on the HTTP/2 fast path.
type h2x struct {
	h      *h2conn
	s      *h2.Stream
	route  *routetable.Route
	host   string
	start  time.Time
	id     []byte
	idBuf  [24]byte
	fields []hpack.HeaderField // the response head being built
	xff    []string
	cookie []string
}

var h2xs = sync.Pool{New: func() any { return &h2x{fields: make([]hpack.HeaderField, 0, 16)} }}

func (p *Proxy) serveH2Fast(h *h2conn, s *h2.Stream, route *routetable.Route, in *routetable.Instance, host string, start time.Time) {
	class := p.hostClass(route)
	cm := p.classMetrics(class)
	p.m.h2fast.Inc()
	x := h2xs.Get().(*h2x)
	x.h, x.s, x.route, x.host, x.start = h, s, route, host, start
	code := p.h2Exchange(x, in)
	cm.count(p, code, class)
	took := time.Since(start)
	cm.latency.Observe(took.Seconds())
	if p.cfg.AccessLog {
		path, _, _ := strings.Cut(s.Path, "?")
		p.log.Info("request", "host", host, "method", s.Method, "path", path, "status", code,
			"client", h.client, "duration_ms", took.Milliseconds(), "request_id", string(x.id))
	}
	clear(x.fields[:cap(x.fields)])
	clear(x.xff)
	clear(x.cookie)
	*x = h2x{fields: x.fields[:0], xff: x.xff[:0], cookie: x.cookie[:0]}
	h2xs.Put(x)
}

func (p *Proxy) h2Exchange(x *h2x, in *routetable.Instance) int {
	s := x.s
	if p.limiter != nil {
		if ok, wait := p.limiter.Allow(x.h.client, x.start); !ok {
			p.m.limited.Inc()
			x.answer(429, "429 Too Many Requests: slow down\n", "retry-after", strconv.Itoa(int(wait/time.Second)+1))
			return 429
		}
	}
	x.id = nil
	for _, f := range s.Header {
		if f.Name == "x-request-id" {
			if len(f.Value) > 0 && len(f.Value) <= 200 {
				x.id = []byte(f.Value)
			}
			break
		}
	}
	if x.id == nil {
		putRequestID(&x.idBuf)
		x.id = x.idBuf[:]
	}
	var tried []string
	var uc *upConn
	for attempt := 0; ; attempt++ {
		st := p.stateOf(in.ID)
		st.outstanding.Add(1)
		var err error
		uc, err = p.h2RoundTrip(x, in)
		st.outstanding.Add(-1)
		if s.Context().Err() != nil {
			if uc != nil {
				_ = uc.conn.Close()
			}
			return 499 // the client's doing, not the instance's
		}
		if err == nil && p.attemptDone(st, uc.resp.Status) {
			break
		}
		p.attemptFailed(st)
		tried = append(tried, in.ID)
		var next *routetable.Instance
		if attempt < maxRetries {
			next = p.pick(x.route, tried)
		}
		if next == nil {
			if err != nil {
				p.m.proxyErr.Inc()
				x.answer(502, "502 Bad Gateway: the app did not answer\n", "retry-after", "1")
				return 502
			}
			break // pass the node agent's 502/503 on
		}
		if uc != nil {
			s.SetAbort(nil)
			_ = uc.conn.Close()
		}
		in = next
	}
	status := uc.resp.Status
	if err := p.h2Forward(x, uc); err != nil && s.Context().Err() != nil {
		return 499
	}
	return status
}

// h2RoundTrip sends x's request to instance in over a pooled connection
// and reads the response head, as fastRoundTrip does.
func (p *Proxy) h2RoundTrip(x *h2x, in *routetable.Instance) (*upConn, error) {
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
			if uc, err = p.up.dial(x.s.Context(), key); err != nil {
				return nil, err
			}
		}
		x.s.SetAbort(uc.conn)
		err := p.h2Send(x, uc, in)
		if err == nil {
			return uc, nil
		}
		x.s.SetAbort(nil)
		_ = uc.conn.Close()
		if attempt == 0 && uc.reused && uc.cr.n == 0 && x.s.Context().Err() == nil && err != errNodeGone {
			continue
		}
		return nil, err
	}
}

// h2Send writes x's request as HTTP/1.1 on uc, with the same header
// rewriting as the HTTP/1.1 fast path (send), and reads the final
// response head; informational answers go to the client as they come.
func (p *Proxy) h2Send(x *h2x, uc *upConn, in *routetable.Instance) error {
	uc.cr.n = 0
	s := x.s
	w := uc.bw
	w.WriteString(s.Method)
	w.WriteByte(' ')
	w.WriteString(s.Path)
	w.WriteString(" HTTP/1.1\r\nHost: ")
	w.WriteString(s.Authority)
	w.WriteString("\r\n")
	xff, cookie := x.xff[:0], x.cookie[:0]
	for _, f := range s.Header {
		switch h1.KindOf(f.Name) {
		case h1.XForwardedFor:
			xff = append(xff, f.Value)
			continue
		case h1.Host, h1.Connection, h1.HopByHop, h1.Trailer, h1.Forwarded, h1.XForwardedHost, h1.XForwardedProto, h1.XRealIP,
			h1.XRequestID, h1.Internal, h1.ContentLength, h1.TransferEncoding, h1.Expect:
			continue
		}
		if f.Name == "cookie" { // split into fields by HTTP/2 (RFC 9113 8.2.3)
			cookie = append(cookie, f.Value)
			continue
		}
		w.WriteString(f.Name)
		w.WriteString(": ")
		w.WriteString(f.Value)
		w.WriteString("\r\n")
	}
	x.xff, x.cookie = xff, cookie
	if len(cookie) > 0 {
		w.WriteString("cookie: ")
		for i, v := range cookie {
			if i > 0 {
				w.WriteString("; ")
			}
			w.WriteString(v)
		}
		w.WriteString("\r\n")
	}
	w.WriteString("X-Forwarded-For: ")
	for _, v := range xff {
		w.WriteString(v)
		w.WriteString(", ")
	}
	w.WriteString(x.h.client)
	w.WriteString("\r\nX-Forwarded-Host: ")
	w.WriteString(s.Authority)
	w.WriteString("\r\nX-Forwarded-Proto: https\r\nX-Real-Ip: ")
	w.WriteString(x.h.client)
	w.WriteString("\r\nX-Request-Id: ")
	w.Write(x.id)
	w.WriteString("\r\nX-Zeitwork-Instance: ")
	w.WriteString(in.ID)
	w.WriteString("\r\nX-Zeitwork-Token: ")
	w.WriteString(p.cfg.ClusterToken)
	w.WriteString("\r\n\r\n")
	if err := w.Flush(); err != nil {
		return err
	}
	runtime.Gosched() // see upstream.roundTrip
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
		if err := s.WriteHeaders(st, x.responseFields(uc, false), false); err != nil {
			return err
		}
		_, _ = uc.br.Discard(n)
	}
}

// responseFields are the response head's fields for HTTP/2: names in
// lower case, without the connection's own (hop-by-hop) fields.
func (x *h2x) responseFields(uc *upConn, final bool) []hpack.HeaderField {
	r := &uc.resp
	f := x.fields[:0]
	if final {
		// Never indexed: a new value each time would only evict the
		// fields that repeat from the client's table.
		f = append(f, hpack.HeaderField{Name: "x-request-id", Value: string(x.id), Sensitive: true})
		if x.h.tls != nil && x.route.Kind == "custom" {
			f = append(f, hpack.HeaderField{Name: "strict-transport-security", Value: "max-age=31536000"})
		}
	}
	dated := false
	for _, h := range r.Headers {
		switch h.Kind {
		case h1.HopByHop, h1.Connection:
			continue
		case h1.Trailer:
			if !r.Chunked {
				continue
			}
		case h1.Date:
			dated = true
		}
		f = append(f, hpack.HeaderField{Name: lowerName(h.Name), Value: values.get(h.Value)})
	}
	if final {
		if !dated {
			f = append(f, hpack.HeaderField{Name: "date", Value: httpDateString(time.Now())})
		}
		if r.Length >= 0 {
			var n [20]byte
			f = append(f, hpack.HeaderField{Name: "content-length", Value: values.get(strconv.AppendInt(n[:0], r.Length, 10))})
		}
	}
	x.fields = f
	return f
}

// commonNames are response header names in lower case, looked up
// without allocating.
var commonNames = func() map[string]string {
	m := map[string]string{}
	for _, n := range []string{"content-type", "content-encoding", "cache-control", "etag", "last-modified", "expires", "vary",
		"server", "set-cookie", "location", "accept-ranges", "age", "content-language", "content-disposition", "link",
		"access-control-allow-origin", "x-content-type-options", "x-frame-options", "strict-transport-security", "trailer", "date"} {
		m[n] = n
		m[http.CanonicalHeaderKey(n)] = n
	}
	return m
}()

// values interns short response header values (Content-Type, Server,
// Cache-Control, lengths, the Date of this second), so that an answer's
// head usually allocates no strings: a bounded map, emptied when full.
var values = &interner{m: make(map[string]string, 256)}

type interner struct {
	mu sync.Mutex
	m  map[string]string
}

func (in *interner) get(b []byte) string {
	if len(b) > 64 {
		return string(b)
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if v, ok := in.m[string(b)]; ok {
		return v
	}
	if len(in.m) >= 1024 {
		clear(in.m)
	}
	v := string(b)
	in.m[v] = v
	return v
}

func lowerName(b []byte) string {
	if n, ok := commonNames[string(b)]; ok {
		return n
	}
	return strings.ToLower(string(b))
}

// h2Forward writes the response read on uc to the stream and returns uc
// to the pool when the exchange ended cleanly.
func (p *Proxy) h2Forward(x *h2x, uc *upConn) error {
	s := x.s
	r := &uc.resp
	bodyless := r.BodyLess(s.Method == http.MethodHead)
	closeDelimited := !bodyless && !r.Chunked && r.Length < 0
	fields := x.responseFields(uc, true)
	_, _ = uc.br.Discard(uc.headLen)
	err := s.WriteHeaders(r.Status, fields, bodyless || (!r.Chunked && r.Length == 0))
	if err == nil && !bodyless {
		switch {
		case r.Chunked:
			err = h2Chunked(s, uc.br)
		case r.Length > 0:
			err = h2Copy(s, uc.br, r.Length)
		case closeDelimited:
			err = h2Copy(s, uc.br, -1)
		}
	}
	s.SetAbort(nil)
	if err != nil || r.Close || closeDelimited || uc.br.Buffered() > 0 {
		_ = uc.conn.Close()
	} else {
		p.up.put(uc)
	}
	if err != nil {
		_ = s.Reset(http2.ErrCodeInternal)
	}
	return err
}

// h2Copy sends n bytes of br (until EOF when n < 0) as DATA, the last
// frame ending the stream; bytes go from br's buffer into the frames.
func h2Copy(s *h2.Stream, br *bufio.Reader, n int64) error {
	max := s.MaxData()
	for n != 0 {
		if br.Buffered() == 0 {
			if _, err := br.Peek(1); err != nil {
				if n < 0 && err == io.EOF {
					return s.Write(nil, true)
				}
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return err
			}
		}
		k := br.Buffered()
		if n >= 0 && int64(k) > n {
			k = int(n)
		}
		k = min(k, max)
		b, _ := br.Peek(k)
		if n > 0 {
			n -= int64(k)
		}
		if err := s.Write(b, n == 0); err != nil {
			return err
		}
		_, _ = br.Discard(k)
	}
	return nil
}

// h2Chunked sends a chunked body as DATA frames, and its trailers, if
// any, as the stream's last HEADERS.
func h2Chunked(s *h2.Stream, br *bufio.Reader) error {
	buf := bufs.Get().(*[]byte)
	defer bufs.Put(buf)
	b := (*buf)[:min(len(*buf), s.MaxData())]
	cr := httputil.NewChunkedReader(br)
	for {
		n, err := cr.Read(b)
		if n > 0 {
			if werr := s.Write(b[:n], false); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
	}
	tr, err := textproto.NewReader(br).ReadMIMEHeader()
	if err != nil {
		return err
	}
	if len(tr) == 0 {
		return s.Write(nil, true)
	}
	var fields []hpack.HeaderField
	for k, vv := range tr {
		name := strings.ToLower(k)
		switch h1.KindOf(name) {
		case h1.HopByHop, h1.Connection, h1.ContentLength, h1.TransferEncoding, h1.Trailer:
			continue
		}
		for _, v := range vv {
			fields = append(fields, hpack.HeaderField{Name: name, Value: v})
		}
	}
	return s.WriteTrailers(fields)
}

// answer writes a short plain-text answer of the edge's own, as
// exchange.answer does over HTTP/1.1.
func (x *h2x) answer(code int, body, hk, hv string) {
	f := append(x.fields[:0],
		hpack.HeaderField{Name: "content-type", Value: "text/plain; charset=utf-8"},
		hpack.HeaderField{Name: "x-content-type-options", Value: "nosniff"},
		hpack.HeaderField{Name: hk, Value: hv})
	if x.id != nil {
		f = append(f, hpack.HeaderField{Name: "x-request-id", Value: string(x.id)})
	}
	f = append(f, hpack.HeaderField{Name: "date", Value: httpDateString(time.Now())},
		hpack.HeaderField{Name: "content-length", Value: strconv.Itoa(len(body))})
	x.fields = f
	head := x.s.Method == http.MethodHead
	if err := x.s.WriteHeaders(code, f, head); err == nil && !head {
		_ = x.s.Write([]byte(body), true)
	}
}

// serveHTTP serves a stream through Proxy.ServeHTTP: it becomes an
// http.Request, the stream its ResponseWriter.
func (h *h2conn) serveHTTP(s *h2.Stream) {
	if s.TooLarge {
		h.plain(s, http.StatusRequestHeaderFieldsTooLarge, "431 Request Header Fields Too Large\n")
		return
	}
	if s.Method == http.MethodConnect {
		h.plain(s, http.StatusMethodNotAllowed, "405 Method Not Allowed: CONNECT\n")
		return
	}
	u, err := url.ParseRequestURI(s.Path)
	if err != nil || !validAuthority(s.Authority) {
		h.plain(s, http.StatusBadRequest, "400 Bad Request\n")
		return
	}
	hdr := make(http.Header, len(s.Header))
	var cookies []string
	for _, f := range s.Header {
		if f.Name == "cookie" {
			cookies = append(cookies, f.Value)
			continue
		}
		k := http.CanonicalHeaderKey(f.Name)
		hdr[k] = append(hdr[k], f.Value)
	}
	if len(cookies) > 0 {
		hdr["Cookie"] = []string{strings.Join(cookies, "; ")}
	}
	delete(hdr, "Host")
	r := &http.Request{Method: s.Method, URL: u, Proto: "HTTP/2.0", ProtoMajor: 2, Header: hdr, Host: s.Authority,
		RemoteAddr: h.remote, RequestURI: s.Path, TLS: h.tls, Body: http.NoBody}
	if !s.EndedRequest() {
		r.ContentLength = s.ContentLength
		b := &h2Body{s: s, r: r}
		r.Body = b
		for _, v := range hdr["Trailer"] {
			for _, k := range strings.Split(v, ",") {
				if k = http.CanonicalHeaderKey(strings.TrimSpace(k)); k != "" {
					if r.Trailer == nil {
						r.Trailer = http.Header{}
					}
					r.Trailer[k] = nil
				}
			}
		}
	}
	r = r.WithContext(s.Context())
	w := &h2Writer{s: s, hdr: http.Header{}, head: s.Method == http.MethodHead}
	h.p.ServeHTTP(w, r)
	w.finish()
}

// validAuthority accepts what net/http accepts as a request's host.
func validAuthority(a string) bool {
	return a != "" && !strings.ContainsAny(a, " \t\r\n/\\@")
}

// plain answers a stream with a short text of the edge's own.
func (h *h2conn) plain(s *h2.Stream, code int, body string) {
	f := []hpack.HeaderField{{Name: "content-type", Value: "text/plain; charset=utf-8"},
		{Name: "content-length", Value: strconv.Itoa(len(body))}}
	if err := s.WriteHeaders(code, f, false); err == nil {
		_ = s.Write([]byte(body), true)
	}
}

// h2Body is a request body read from its stream.
type h2Body struct {
	s *h2.Stream
	r *http.Request
}

func (b *h2Body) Read(p []byte) (int, error) {
	n, err := b.s.Read(p)
	if err == io.EOF && b.r.Trailer != nil {
		for _, f := range b.s.Trailer() {
			k := http.CanonicalHeaderKey(f.Name)
			b.r.Trailer[k] = append(b.r.Trailer[k], f.Value)
		}
	}
	return n, err
}

func (b *h2Body) Close() error { return nil }

// h2Writer is a stream as an http.ResponseWriter. The head goes out with
// the first write, flush or the end, so an answer without a body is one
// HEADERS frame.
type h2Writer struct {
	s      *h2.Stream
	hdr    http.Header
	status int
	sent   bool
	head   bool
	err    error
}

func (w *h2Writer) Header() http.Header { return w.hdr }

func (w *h2Writer) WriteHeader(code int) {
	if w.status != 0 || w.err != nil {
		return
	}
	if code < 200 {
		if code != http.StatusSwitchingProtocols {
			w.err = w.s.WriteHeaders(code, h2Fields(w.hdr, nil), false)
		}
		return
	}
	w.status = code
}

func (w *h2Writer) sendHead(end bool) {
	if w.sent || w.err != nil {
		return
	}
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.sent = true
	f := h2Fields(w.hdr, nil)
	if w.hdr.Get("Date") == "" {
		f = append(f, hpack.HeaderField{Name: "date", Value: httpDateString(time.Now())})
	}
	w.err = w.s.WriteHeaders(w.status, f, end)
}

func (w *h2Writer) Write(p []byte) (int, error) {
	w.sendHead(false)
	if w.err != nil {
		return 0, w.err
	}
	if w.head {
		return len(p), nil
	}
	if err := w.s.Write(p, false); err != nil {
		w.err = err
		return 0, err
	}
	return len(p), nil
}

func (w *h2Writer) Flush() { w.sendHead(false) }

// finish ends the stream: the head if not sent, trailers if any.
func (w *h2Writer) finish() {
	trailers := w.trailers()
	if !w.sent {
		w.sendHead(len(trailers) == 0)
		if len(trailers) == 0 {
			return
		}
	}
	if w.err != nil {
		return
	}
	if len(trailers) > 0 {
		w.err = w.s.WriteTrailers(trailers)
		return
	}
	w.err = w.s.Write(nil, true)
}

// trailers collects the trailer fields set after the head: the ones
// announced in Trailer and those named with http.TrailerPrefix.
func (w *h2Writer) trailers() []hpack.HeaderField {
	var f []hpack.HeaderField
	for _, v := range w.hdr["Trailer"] {
		for _, k := range strings.Split(v, ",") {
			k = http.CanonicalHeaderKey(strings.TrimSpace(k))
			for _, val := range w.hdr[k] {
				f = append(f, hpack.HeaderField{Name: strings.ToLower(k), Value: val})
			}
		}
	}
	for k, vv := range w.hdr {
		if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok {
			for _, v := range vv {
				f = append(f, hpack.HeaderField{Name: strings.ToLower(name), Value: v})
			}
		}
	}
	return f
}

// h2Fields converts a header map to HTTP/2 fields without the
// connection's own and trailer-prefixed ones.
func h2Fields(h http.Header, f []hpack.HeaderField) []hpack.HeaderField {
	for k, vv := range h {
		switch k {
		case "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade":
			continue
		}
		if strings.HasPrefix(k, http.TrailerPrefix) {
			continue
		}
		name := strings.ToLower(k)
		for _, v := range vv {
			f = append(f, hpack.HeaderField{Name: name, Value: v})
		}
	}
	return f
}

var _ http.Flusher = (*h2Writer)(nil)
