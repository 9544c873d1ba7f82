// Package egress is a builder microVM's only way out: on the host, a
// Proxy that accepts HTTP CONNECT requests on the VM's tap address and
// opens a tunnel only to the endpoints (host:port) on its allowlist; in the
// guest, a Forwarder that listens on a local address for each endpoint
// (the endpoint's own loopback address, or an address /etc/hosts maps its
// name to) and tunnels every connection through the proxy. Tools in the
// VM (buildah, and the RUN steps of a Dockerfile) reach a registry or a
// package mirror under its usual name without proxy settings, TLS is end
// to end, and nothing else is reachable: the VM has no route, no DNS and
// no NAT to anywhere.
package egress

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Endpoint is one allowed destination.
type Endpoint struct {
	Host string `json:"host"` // DNS name or IP literal
	Port int    `json:"port"`
}

func (e Endpoint) String() string { return net.JoinHostPort(e.Host, strconv.Itoa(e.Port)) }

// ParseEndpoint reads "host:port" (IPv6 literals in brackets).
func ParseEndpoint(s string) (Endpoint, error) {
	host, port, err := net.SplitHostPort(strings.TrimSpace(s))
	if err != nil {
		return Endpoint{}, fmt.Errorf("endpoint %q is not host:port", s)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 1 || p > 65535 {
		return Endpoint{}, fmt.Errorf("endpoint %q: port must be 1..65535", s)
	}
	host = strings.ToLower(host)
	if net.ParseIP(host) == nil && !validName(host) {
		return Endpoint{}, fmt.Errorf("endpoint %q: %q is neither an IP address nor a DNS name", s, host)
	}
	return Endpoint{Host: host, Port: p}, nil
}

func validName(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for _, l := range strings.Split(h, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, c := range l {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// Proxy is the host side: an HTTP CONNECT proxy with an allowlist.
type Proxy struct {
	allow   map[string]bool
	log     *slog.Logger
	ln      net.Listener
	denied  atomic.Int64
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	closing bool
}

// Listen starts a proxy on addr that tunnels to allow only.
func Listen(addr string, allow []Endpoint, log *slog.Logger) (*Proxy, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cannot listen for builder egress on %s: %w", addr, err)
	}
	p := &Proxy{allow: map[string]bool{}, log: log, ln: ln, conns: map[net.Conn]struct{}{}}
	for _, e := range allow {
		p.allow[e.String()] = true
	}
	p.wg.Go(p.serve)
	return p, nil
}

// Addr is the proxy's listening address.
func (p *Proxy) Addr() *net.TCPAddr { return p.ln.Addr().(*net.TCPAddr) }

// Denied counts refused CONNECT requests.
func (p *Proxy) Denied() int64 { return p.denied.Load() }

// Close stops accepting, cuts every tunnel and waits for them.
func (p *Proxy) Close() error {
	err := p.ln.Close()
	p.mu.Lock()
	p.closing = true
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	_ = c.Close()
}

func (p *Proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			_ = c.Close()
			return
		}
		p.wg.Go(func() {
			defer p.untrack(c)
			p.tunnel(c)
		})
	}
}

func (p *Proxy) tunnel(c net.Conn) {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReaderSize(c, 4096)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	target := req.Host
	if req.Method != http.MethodConnect {
		p.deny(c, http.StatusMethodNotAllowed, "only CONNECT is proxied")
		return
	}
	e, err := ParseEndpoint(target)
	if err != nil || !p.allow[e.String()] {
		p.denied.Add(1)
		p.log.Warn("builder egress refused", "target", target)
		p.deny(c, http.StatusForbidden, fmt.Sprintf("%s is not on the builder's egress allowlist", target))
		return
	}
	up, err := net.DialTimeout("tcp", e.String(), 10*time.Second)
	if err != nil {
		p.deny(c, http.StatusBadGateway, "cannot reach "+target)
		return
	}
	if !p.track(up) {
		_ = up.Close()
		return
	}
	defer p.untrack(up)
	_ = c.SetReadDeadline(time.Time{})
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		return
	}
	// Bytes the client sent after its request head belong to the tunnel.
	if n := br.Buffered(); n > 0 {
		b, _ := br.Peek(n)
		if _, err := up.Write(b); err != nil {
			return
		}
	}
	splice(c, up)
}

func (p *Proxy) deny(c net.Conn, code int, msg string) {
	_, _ = fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		code, http.StatusText(code), len(msg), msg)
}

// splice copies both ways until either side is done, then closes both.
func splice(a, b net.Conn) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		} else {
			_ = dst.Close()
		}
	}
	wg.Go(func() { cp(a, b) })
	cp(b, a)
	wg.Wait()
}

// Route is one guest-side listener: Listen on Local, tunnel to Endpoint.
type Route struct {
	Endpoint Endpoint `json:"endpoint"`
	Local    string   `json:"local"` // guest IP the endpoint's name maps to (or its own loopback IP)
}

// Routes assigns guest addresses: an endpoint whose host is an IP is
// served on that IP (the guest adds it to its loopback device), a named
// endpoint on 127.0.1.N, one address per name. Hosts returns the
// /etc/hosts lines for the names.
func Routes(allow []Endpoint) (routes []Route, hosts string) {
	names := map[string]string{}
	var b strings.Builder
	for _, e := range allow {
		local := e.Host
		if net.ParseIP(e.Host) == nil {
			if names[e.Host] == "" {
				names[e.Host] = fmt.Sprintf("127.0.1.%d", len(names)+1)
				fmt.Fprintf(&b, "%s\t%s\n", names[e.Host], e.Host)
			}
			local = names[e.Host]
		}
		routes = append(routes, Route{Endpoint: e, Local: local})
	}
	return routes, b.String()
}

// Forwarder is the guest side.
type Forwarder struct {
	proxy string
	lns   []net.Listener
	wg    sync.WaitGroup
}

// Forward listens for every route and tunnels through the proxy at
// proxyAddr. Close ends it.
func Forward(proxyAddr string, routes []Route) (*Forwarder, error) {
	f := &Forwarder{proxy: proxyAddr}
	for _, r := range routes {
		ln, err := net.Listen("tcp", net.JoinHostPort(r.Local, strconv.Itoa(r.Endpoint.Port)))
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("cannot listen for %s: %w", r.Endpoint, err)
		}
		f.lns = append(f.lns, ln)
		f.wg.Go(func() { f.accept(ln, r.Endpoint) })
	}
	return f, nil
}

// Close stops the listeners (tunnels in flight end with their peers).
func (f *Forwarder) Close() error {
	var errs []error
	for _, ln := range f.lns {
		errs = append(errs, ln.Close())
	}
	f.wg.Wait()
	return errors.Join(errs...)
}

func (f *Forwarder) accept(ln net.Listener, e Endpoint) {
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		conns.Go(func() {
			defer c.Close()
			up, err := Dial(context.Background(), f.proxy, e)
			if err != nil {
				return
			}
			defer up.Close()
			splice(c, up)
		})
	}
}

// Dial opens a tunnel to e through the proxy at proxyAddr.
func Dial(ctx context.Context, proxyAddr string, e Endpoint) (net.Conn, error) {
	var d net.Dialer
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", proxyAddr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", e, e); err != nil {
		c.Close()
		return nil, err
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		c.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		c.Close()
		return nil, fmt.Errorf("egress proxy refused %s: %s %s", e, resp.Status, strings.TrimSpace(string(msg)))
	}
	_ = c.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		return nil, errors.New("egress proxy sent data before the tunnel opened")
	}
	return c, nil
}
