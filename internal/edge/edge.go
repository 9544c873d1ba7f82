// Package edge is Zeitwork's HTTP(S) front door (zeitwork-edge-proxy):
// TLS termination (a static wildcard certificate for the apps domain, ACME
// certificates on demand for verified customer domains), client IPs from
// the load balancer's PROXY header, per-IP rate limiting, and routing by
// Host to a healthy instance of the right deployment through its node
// agent — of the edge's own region first — with least-outstanding-requests
// balancing, up to two retries of idempotent requests on another instance
// (on a connection failure, a node agent's 502/503, or a node that stopped
// answering: see Config.TryTimeout), and passive ejection of failing
// instances.
package edge

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/edge/ratelimit"
	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// Config is the proxy's configuration.
type Config struct {
	AppsDomain   string
	ClusterToken string
	RateRPS      float64
	RateBurst    int
	RateMaxKeys  int
	MaxBodyBytes int64
	AccessLog    bool
	// Region is the edge's region: pick prefers its instances.
	Region string
	// EjectAfter consecutive upstream failures eject an instance for
	// EjectFor.
	EjectAfter int
	EjectFor   time.Duration
	// ConnectTimeout bounds a dial to a node agent (default 2 s: node
	// agents are normally in the edge's region).
	ConnectTimeout time.Duration
	// TryTimeout (0: none) is how long a try of a request that is safe
	// to repeat — a bodiless GET, HEAD or OPTIONS — waits for the first
	// byte of its answer before the edge checks that the node agent
	// still accepts connections. A node that does not is gone: the try
	// fails and the request is retried on another instance. A node that
	// does keeps the request waiting for as long as the app takes (long
	// polls), checked again every TryTimeout.
	TryTimeout time.Duration
}

// maxRetries bounds the tries of one request after the first: on another
// instance each, for requests that are safe to repeat.
const maxRetries = 2

// Proxy routes requests to instances.
type Proxy struct {
	cfg     Config
	routes  *routetable.Client
	limiter *ratelimit.Limiter
	log     *slog.Logger
	m       *metrics
	rp      *httputil.ReverseProxy
	up      *upstream // the node-agent connection pool (both paths)

	mu    sync.Mutex // classes' copy on write
	state sync.Map   // instance id → *instState; read on every request, added to rarely
	// classes holds each host class's pre-resolved metrics (copy on
	// write, under mu).
	classes atomic.Pointer[map[string]*classMetrics]
}

// classMetrics are one host class's series, resolved once instead of by
// label values on every request.
type classMetrics struct {
	codes   [6]prometheus.Counter // by status code / 100, 1..5
	latency prometheus.Observer
}

func (p *Proxy) classMetrics(class string) *classMetrics {
	if m := p.classes.Load(); m != nil {
		if cm := (*m)[class]; cm != nil {
			return cm
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	old := p.classes.Load()
	if old != nil {
		if cm := (*old)[class]; cm != nil {
			return cm
		}
	}
	cm := &classMetrics{latency: p.m.latency.WithLabelValues(class)}
	for i := 1; i < len(cm.codes); i++ {
		cm.codes[i] = p.m.requests.WithLabelValues(strconv.Itoa(i)+"xx", class)
	}
	m := make(map[string]*classMetrics, 4)
	if old != nil {
		for k, v := range *old {
			m[k] = v
		}
	}
	m[class] = cm
	p.classes.Store(&m)
	return cm
}

func (cm *classMetrics) count(p *Proxy, code int, class string) {
	if i := code / 100; i > 0 && i < len(cm.codes) {
		cm.codes[i].Inc()
		return
	}
	p.m.requests.WithLabelValues(strconv.Itoa(code/100)+"xx", class).Inc()
}

type instState struct {
	outstanding  atomic.Int64
	failures     atomic.Int64
	ejectedUntil atomic.Int64 // unix nanos
}

type metrics struct {
	requests    *prometheus.CounterVec
	latency     *prometheus.HistogramVec
	upstreamErr *prometheus.CounterVec
	connectErr  prometheus.Counter // upstreamErr{kind="connect"}
	proxyErr    prometheus.Counter // upstreamErr{kind="proxy"}
	fast        prometheus.Counter
	h2fast      prometheus.Counter
	limited     prometheus.Counter
	certExpiry  *certExpiry
	acme        *prometheus.CounterVec
	staleness   prometheus.GaugeFunc
}

// New builds the proxy.
func New(cfg Config, routes *routetable.Client, reg prometheus.Registerer, log *slog.Logger) *Proxy {
	if cfg.EjectAfter == 0 {
		cfg.EjectAfter = 3
	}
	if cfg.EjectFor == 0 {
		cfg.EjectFor = 10 * time.Second
	}
	if cfg.RateMaxKeys == 0 {
		cfg.RateMaxKeys = 100_000
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 2 * time.Second
	}
	p := &Proxy{cfg: cfg, routes: routes, log: log}
	if cfg.RateRPS > 0 {
		p.limiter = ratelimit.New(cfg.RateRPS, cfg.RateBurst, cfg.RateMaxKeys)
	}
	p.m = &metrics{
		requests:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_edge_proxy_requests_total", Help: "Requests by status class and host class."}, []string{"code", "host_class"}),
		latency:     prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "zeitwork_edge_proxy_request_duration_seconds", Help: "Time to response headers.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}, []string{"host_class"}),
		upstreamErr: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_edge_proxy_upstream_errors_total", Help: "Upstream failures by kind."}, []string{"kind"}),
		limited:     prometheus.NewCounter(prometheus.CounterOpts{Name: "zeitwork_edge_proxy_rate_limited_total", Help: "Requests answered 429."}),
		certExpiry:  newCertExpiry(),
		acme: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_edge_proxy_acme_certificates_total",
			Help: "ACME certificate orders (first issue and renewal) by result: obtained, failed."}, []string{"result"}),
		staleness: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "zeitwork_edge_proxy_route_table_staleness_seconds", Help: "Seconds since the route table was last synced (-1: never)."},
			func() float64 { return routes.Staleness().Seconds() }),
	}
	p.m.fast = prometheus.NewCounter(prometheus.CounterOpts{Name: "zeitwork_edge_proxy_fast_path_requests_total", Help: "HTTP/1.1 requests served by the fast path (the rest by net/http)."})
	p.m.h2fast = prometheus.NewCounter(prometheus.CounterOpts{Name: "zeitwork_edge_proxy_h2_fast_path_requests_total", Help: "HTTP/2 requests served by the HTTP/2 fast path (the rest through ServeHTTP)."})
	p.m.acme.WithLabelValues("obtained")
	p.m.acme.WithLabelValues("failed")
	p.m.connectErr = p.m.upstreamErr.WithLabelValues("connect")
	p.m.proxyErr = p.m.upstreamErr.WithLabelValues("proxy")
	if reg != nil {
		reg.MustRegister(p.m.requests, p.m.fast, p.m.h2fast, p.m.latency, p.m.upstreamErr, p.m.limited, p.m.certExpiry, p.m.acme, p.m.staleness)
	}
	p.up = newUpstream(newTransport(cfg.ConnectTimeout), cfg.TryTimeout, cfg.ConnectTimeout)
	p.rp = &httputil.ReverseProxy{
		Rewrite:      p.rewrite,
		Transport:    &retryTransport{p: p, base: p.up},
		ErrorHandler: p.upstreamError,
		BufferPool:   bufferPool{},
	}
	return p
}

func newTransport(connectTimeout time.Duration) *http.Transport {
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           polledDial(&net.Dialer{Timeout: connectTimeout, KeepAlive: 30 * time.Second}),
		MaxIdleConns:          4096,
		MaxIdleConnsPerHost:   1024,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
		ResponseHeaderTimeout: 0, // long polls and streams are fine (see upstream.awaitAnswer)
	}
}

type bufferPool struct{}

var bufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (bufferPool) Get() []byte  { return *(bufs.Get().(*[]byte)) }
func (bufferPool) Put(b []byte) { bufs.Put(&b) }

// Limiter exposes the rate limiter (nil when disabled).
func (p *Proxy) Limiter() *ratelimit.Limiter { return p.limiter }

// CertExpiry records a certificate's expiry for /metrics.
func (p *Proxy) CertExpiry(name string, notAfter time.Time) {
	p.m.certExpiry.set(name, notAfter)
}

// hostOf returns the lower-case host without port.
func hostOf(h string) string {
	if strings.IndexByte(h, ':') >= 0 { // (no error to allocate when there is no port)
		if host, _, err := net.SplitHostPort(h); err == nil {
			h = host
		}
	}
	return strings.TrimSuffix(strings.ToLower(h), ".")
}

func (p *Proxy) hostClass(r *routetable.Route) string {
	if r == nil {
		return "unknown"
	}
	return r.Kind
}

type ctxKey struct{}

type reqState struct {
	route    *routetable.Route
	client   string
	tried    []string
	instance *routetable.Instance
	reqID    string
}

// ServeHTTP handles one request (HTTPS, or plain HTTP on the internal
// port).
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	host := hostOf(r.Host)
	route := p.routes.Table().Lookup(host)
	class := p.hostClass(route)
	sw := &statusWriter{ResponseWriter: w}
	client := clientIP(r)
	defer func() {
		code := sw.code
		if code == 0 {
			code = 200
		}
		cm := p.classMetrics(class)
		cm.count(p, code, class)
		took := time.Since(start)
		cm.latency.Observe(took.Seconds())
		if p.cfg.AccessLog {
			p.log.Info("request", "host", host, "method", r.Method, "path", r.URL.Path, "status", code, "client", client,
				"duration_ms", took.Milliseconds(), "request_id", sw.Header().Get("X-Request-Id"))
		}
	}()
	if p.limiter != nil {
		if ok, wait := p.limiter.Allow(client, start); !ok {
			p.m.limited.Inc()
			secs := int(wait/time.Second) + 1
			sw.Header().Set("Retry-After", strconv.Itoa(secs))
			http.Error(sw, "429 Too Many Requests: slow down", http.StatusTooManyRequests)
			return
		}
	}
	if route == nil {
		sw.Header().Set("Content-Type", "text/plain; charset=utf-8")
		sw.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(sw, "404 Not Found: no Zeitwork deployment answers for %s\n", host)
		return
	}
	if r.TLS != nil && route.Kind == "custom" {
		sw.Header().Set("Strict-Transport-Security", "max-age=31536000")
	}
	if p.cfg.MaxBodyBytes > 0 {
		if r.ContentLength > p.cfg.MaxBodyBytes {
			http.Error(sw, "413 Request Entity Too Large", http.StatusRequestEntityTooLarge)
			return
		}
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = http.MaxBytesReader(sw, r.Body, p.cfg.MaxBodyBytes)
		}
	}
	st := &reqState{route: route, client: client, reqID: r.Header.Get("X-Request-Id")}
	if st.reqID == "" || len(st.reqID) > 200 {
		st.reqID = newRequestID()
	}
	sw.Header().Set("X-Request-Id", st.reqID)
	st.instance = p.pick(route, nil)
	if st.instance == nil {
		sw.Header().Set("Retry-After", "2")
		sw.Header().Set("Content-Type", "text/plain; charset=utf-8")
		sw.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintf(sw, "503 Service Unavailable: %s has no healthy instance right now\n", host)
		return
	}
	p.rp.ServeHTTP(sw, r.WithContext(context.WithValue(r.Context(), ctxKey{}, st)))
}

// newRequestID returns 96 random bits in hex. Request ids correlate logs;
// they are not secrets, so the runtime's ChaCha8 generator (seeded from the
// OS) serves, without a system call per request.
func newRequestID() string {
	var out [24]byte
	putRequestID(&out)
	return string(out[:])
}

// putRequestID writes a new request id into out.
func putRequestID(out *[24]byte) {
	var b [12]byte
	x, y := rand.Uint64(), rand.Uint32()
	for i := range 8 {
		b[i] = byte(x >> (8 * i))
	}
	for i := range 4 {
		b[8+i] = byte(y >> (8 * i))
	}
	hex.Encode(out[:], b[:])
}

// pick chooses a healthy, non-ejected instance by the power of two random
// choices on outstanding requests, skipping those already tried. It
// prefers the edge's own region (Config.Region): another region's
// instances serve only when none of its own is healthy and not ejected —
// a request then crosses regions rather than fail, and a region that is
// lost (its nodes silent until they leave the route table) is not tried
// by the edges of the others while they have instances of their own.
// Ejected instances serve only when nothing else is left.
func (p *Proxy) pick(route *routetable.Route, tried []string) *routetable.Instance {
	now := time.Now().UnixNano()
	var buf [16]*routetable.Instance
	cands := buf[:0]
	for pass := 0; pass < 3 && len(cands) == 0; pass++ {
		if pass == 0 && p.cfg.Region == "" {
			continue
		}
		for i := range route.Instances {
			in := &route.Instances[i]
			if !in.Healthy || (pass == 0 && in.Region != p.cfg.Region) || contains(tried, in.ID) {
				continue
			}
			if pass < 2 && p.stateOf(in.ID).ejectedUntil.Load() > now {
				continue
			}
			cands = append(cands, in)
		}
	}
	switch len(cands) {
	case 0:
		return nil
	case 1:
		return cands[0]
	}
	a, b := cands[rand.IntN(len(cands))], cands[rand.IntN(len(cands))]
	if p.stateOf(b.ID).outstanding.Load() < p.stateOf(a.ID).outstanding.Load() {
		return b
	}
	return a
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func (p *Proxy) stateOf(id string) *instState {
	if s, ok := p.state.Load(id); ok {
		return s.(*instState)
	}
	s, _ := p.state.LoadOrStore(id, &instState{})
	return s.(*instState)
}

// PruneState forgets the per-instance state (outstanding requests,
// failures, ejection) of instances no longer in the route table, so a
// long-running edge does not keep one entry for every instance it ever
// routed to.
func (p *Proxy) PruneState() int {
	live := map[string]bool{}
	for _, r := range p.routes.Table().Routes {
		for _, in := range r.Instances {
			live[in.ID] = true
		}
	}
	n := 0
	p.state.Range(func(k, _ any) bool {
		if !live[k.(string)] {
			p.state.Delete(k)
			n++
		}
		return true
	})
	return n
}

func (p *Proxy) rewrite(pr *httputil.ProxyRequest) {
	st := pr.In.Context().Value(ctxKey{}).(*reqState)
	pr.Out.Header["X-Forwarded-For"] = pr.In.Header["X-Forwarded-For"]
	pr.SetXForwarded() // appends the client IP; sets X-Forwarded-Host/Proto
	pr.Out.Header.Set("X-Real-IP", st.client)
	pr.Out.Header.Set("X-Request-Id", st.reqID)
	pr.Out.Host = pr.In.Host
	pr.Out.URL.Scheme = "http"
	pr.Out.URL.Host = "instance.invalid" // set per attempt by retryTransport
}

func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func (p *Proxy) upstreamError(w http.ResponseWriter, r *http.Request, err error) {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		http.Error(w, "413 Request Entity Too Large", http.StatusRequestEntityTooLarge)
		return
	}
	if errors.Is(err, context.Canceled) {
		w.WriteHeader(499)
		return
	}
	p.m.proxyErr.Inc()
	w.Header().Set("Retry-After", "1")
	http.Error(w, "502 Bad Gateway: the app did not answer", http.StatusBadGateway)
}

// retryTransport sends each attempt to the chosen instance's node agent
// and retries an idempotent request once on another instance when the
// connection fails.
type retryTransport struct {
	p    *Proxy
	base http.RoundTripper
}

func idempotent(r *http.Request) bool {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return r.Body == nil || r.Body == http.NoBody
	case http.MethodPut, http.MethodDelete:
		return r.Body == nil || r.Body == http.NoBody
	}
	return false
}

var nodeURLs sync.Map // node address → *url.URL

func nodeURL(addr string) (*url.URL, error) {
	if u, ok := nodeURLs.Load(addr); ok {
		return u.(*url.URL), nil
	}
	u, err := url.Parse(addr)
	if err != nil {
		return nil, err
	}
	nodeURLs.Store(addr, u)
	return u, nil
}

func (t *retryTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	st := r.Context().Value(ctxKey{}).(*reqState)
	in := st.instance
	for attempt := 0; ; attempt++ {
		u, err := nodeURL(in.NodeAddress)
		if err != nil {
			return nil, err
		}
		r.URL.Scheme, r.URL.Host = u.Scheme, u.Host
		r.Header.Set("X-Zeitwork-Instance", in.ID)
		r.Header.Set("X-Zeitwork-Token", t.p.cfg.ClusterToken)
		s := t.p.stateOf(in.ID)
		s.outstanding.Add(1)
		resp, err := t.base.RoundTrip(r)
		s.outstanding.Add(-1)
		if err == nil && t.p.attemptDone(s, resp.StatusCode) {
			return resp, nil
		}
		t.p.attemptFailed(s)
		st.tried = append(st.tried, in.ID)
		if attempt >= maxRetries || !idempotent(r) || r.Context().Err() != nil {
			if err != nil {
				return nil, err
			}
			return resp, nil
		}
		next := t.p.pick(st.route, st.tried)
		if next == nil {
			if err != nil {
				return nil, err
			}
			return resp, nil
		}
		if resp != nil {
			resp.Body.Close()
		}
		in = next
	}
}

// attemptDone reports whether an instance answered an attempt (anything
// but the node agent's 502/503, which say the VM is gone), and then clears
// its failure count.
func (p *Proxy) attemptDone(s *instState, status int) bool {
	if status == http.StatusBadGateway || status == http.StatusServiceUnavailable {
		return false
	}
	s.failures.Store(0)
	return true
}

// attemptFailed counts a failed attempt on an instance (no connection, or
// its node agent's 502/503) and ejects it after EjectAfter in a row.
func (p *Proxy) attemptFailed(s *instState) {
	p.m.connectErr.Inc()
	if n := s.failures.Add(1); n >= int64(p.cfg.EjectAfter) {
		s.ejectedUntil.Store(time.Now().Add(p.cfg.EjectFor).UnixNano())
	}
}

type statusWriter struct {
	http.ResponseWriter
	code int
}

func (s *statusWriter) WriteHeader(code int) {
	if s.code == 0 {
		s.code = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.code == 0 {
		s.code = 200
	}
	return s.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach Flush/Hijack (SSE, WebSockets).
func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (s *statusWriter) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
