package edge

import (
	"context"
	"net"

	"github.com/zeitwork/zeitwork/internal/fifopoll"
)

// Client and node-agent connections run on the edge's own pollers
// (internal/fifopoll, docs/adr/0501): ready connections are served in the
// order the kernel reports them, with raw non-blocking reads and writes.

// adopt moves a TCP connection onto a poller; anything else, or a
// connection the poller cannot take, is returned as is.
func adopt(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	pc, err := fifopoll.Adopt(tc)
	if err != nil {
		return c
	}
	return pc
}

// polledListener hands out accepted TCP connections adopted by a poller.
type polledListener struct{ net.Listener }

func (l polledListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return adopt(c), nil
}

// polledDial dials with d and has a poller adopt the connection.
func polledDial(d *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return adopt(c), nil
	}
}
