package proxyproto

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// ListenerConfig says whom to believe.
type ListenerConfig struct {
	// Trusted reports whether a peer may send a PROXY header. A header from
	// any other peer is rejected (the connection fails).
	Trusted func(net.IP) bool
	// Required rejects trusted peers that send no header.
	Required bool
	// HeaderTimeout bounds how long a connection may take to send its
	// header (default 5 s).
	HeaderTimeout time.Duration
	// OnReject, when set, is called for each rejected connection.
	OnReject func(peer net.Addr, err error)
}

type listener struct {
	net.Listener
	cfg ListenerConfig
}

// NewListener wraps inner so that each accepted connection's RemoteAddr is
// the client address carried by its PROXY header. The header is parsed on
// the connection's first Read or RemoteAddr call, never in Accept, so a slow
// client cannot hold up others.
func NewListener(inner net.Listener, cfg ListenerConfig) net.Listener {
	if cfg.HeaderTimeout == 0 {
		cfg.HeaderTimeout = 5 * time.Second
	}
	if cfg.Trusted == nil {
		cfg.Trusted = func(net.IP) bool { return false }
	}
	return &listener{Listener: inner, cfg: cfg}
}

func (l *listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &Conn{Conn: c, cfg: &l.cfg, br: bufio.NewReaderSize(c, 512)}, nil
}

// Conn is a connection whose header has been (or will be) consumed.
type Conn struct {
	net.Conn
	cfg    *ListenerConfig
	br     *bufio.Reader
	once   sync.Once
	header *Header
	remote net.Addr
	err    error
}

// ErrUntrusted is returned for a header sent by a peer that is not trusted.
var ErrUntrusted = errors.New("PROXY header from an untrusted peer")

func (c *Conn) init() {
	c.once.Do(func() {
		c.remote = c.Conn.RemoteAddr()
		peer, _ := c.remote.(*net.TCPAddr)
		trusted := peer != nil && c.cfg.Trusted(peer.IP)
		_ = c.Conn.SetReadDeadline(time.Now().Add(c.cfg.HeaderTimeout))
		defer c.Conn.SetReadDeadline(time.Time{})
		h, err := Read(c.br)
		switch {
		case errors.Is(err, ErrNoHeader):
			if trusted && c.cfg.Required {
				c.err = fmt.Errorf("peer %s sent no PROXY header", c.remote)
			}
		case err != nil:
			c.err = fmt.Errorf("peer %s: %w", c.remote, err)
		case !trusted:
			c.err = fmt.Errorf("%w %s", ErrUntrusted, c.remote)
		default:
			c.header = h
			if h.Command == Proxy && h.Source != nil {
				c.remote = h.Source
			}
		}
		if c.err != nil {
			if c.cfg.OnReject != nil {
				c.cfg.OnReject(c.Conn.RemoteAddr(), c.err)
			}
			c.Conn.Close()
		}
	})
}

// Read reads application data after the header.
func (c *Conn) Read(b []byte) (int, error) {
	c.init()
	if c.err != nil {
		return 0, c.err
	}
	return c.br.Read(b)
}

// RemoteAddr is the client address from the header (or the peer's own
// address when there was none).
func (c *Conn) RemoteAddr() net.Addr {
	c.init()
	return c.remote
}

// Header returns the parsed header, or nil.
func (c *Conn) Header() *Header {
	c.init()
	return c.header
}
