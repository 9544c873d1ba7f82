package egress

import (
	"bufio"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"testing"
)

// echoServer answers each line with "echo: " + line.
func echoServer(t *testing.T) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					io.WriteString(c, "echo: "+sc.Text()+"\n")
				}
			}()
		}
	}()
	return ln
}

func TestProxyAllowlist(t *testing.T) {
	allowed := echoServer(t)
	denied := echoServer(t)
	ae, _ := ParseEndpoint(allowed.Addr().String())
	de, _ := ParseEndpoint(denied.Addr().String())
	p, err := Listen("127.0.0.1:0", []Endpoint{ae}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	c, err := Dial(t.Context(), p.Addr().String(), ae)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "hi\n")
	line, _ := bufio.NewReader(c).ReadString('\n')
	if line != "echo: hi\n" {
		t.Fatalf("through the tunnel: %q", line)
	}
	c.Close()

	if _, err := Dial(t.Context(), p.Addr().String(), de); err == nil || !strings.Contains(err.Error(), "not on the builder's egress allowlist") {
		t.Fatalf("denied endpoint: %v", err)
	}
	if p.Denied() != 1 {
		t.Fatalf("denied count %d", p.Denied())
	}
	// Anything but CONNECT is refused.
	raw, err := net.Dial("tcp", p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(raw, "GET http://"+ae.String()+"/ HTTP/1.1\r\nHost: "+ae.String()+"\r\n\r\n")
	status, _ := bufio.NewReader(raw).ReadString('\n')
	raw.Close()
	if !strings.Contains(status, "405") {
		t.Fatalf("plain GET: %q", status)
	}
}

// TestForwarder: a guest-side listener on an endpoint's own address
// tunnels through the proxy, and Close ends the tunnels' listeners.
func TestForwarder(t *testing.T) {
	srv := echoServer(t)
	e, _ := ParseEndpoint(srv.Addr().String())
	p, err := Listen("127.0.0.1:0", []Endpoint{e}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// In the guest the route listens on the endpoint's address; here that
	// address is taken by the server itself, so move the route.
	routes := []Route{{Endpoint: e, Local: "127.0.0.9"}}
	f, err := Forward(p.Addr().String(), routes)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.9", strconv.Itoa(e.Port)))
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "via forwarder\n")
	line, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if line != "echo: via forwarder\n" {
		t.Fatalf("forwarded: %q", line)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestRoutes(t *testing.T) {
	allow := []Endpoint{{"127.0.0.1", 5000}, {"registry-1.docker.io", 443}, {"auth.docker.io", 443}, {"registry-1.docker.io", 80}}
	routes, hosts := Routes(allow)
	if routes[0].Local != "127.0.0.1" || routes[1].Local != "127.0.1.1" || routes[2].Local != "127.0.1.2" || routes[3].Local != "127.0.1.1" {
		t.Fatalf("routes %+v", routes)
	}
	if hosts != "127.0.1.1\tregistry-1.docker.io\n127.0.1.2\tauth.docker.io\n" {
		t.Fatalf("hosts %q", hosts)
	}
}

func FuzzParseEndpoint(f *testing.F) {
	for _, s := range []string{"127.0.0.1:5000", "[::1]:443", "registry-1.docker.io:443", "a:0", "-x:1", "a b:1", "host:99999", ":80"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := ParseEndpoint(s)
		if err != nil {
			return
		}
		if e.Port < 1 || e.Port > 65535 || e.Host == "" || strings.ContainsAny(e.Host, " \t\r\n/") {
			t.Fatalf("accepted %q as %+v", s, e)
		}
		again, err := ParseEndpoint(e.String())
		if err != nil || again != e {
			t.Fatalf("%q → %+v does not round-trip: %+v %v", s, e, again, err)
		}
	})
}
