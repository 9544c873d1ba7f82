package guest

import (
	"errors"
	"io"
	"sync"
)

// ErrClosed is returned by a closed Channel.
var ErrClosed = errors.New("agent channel closed")

// Channel is init's end of the agent channel: frames go to, and come from,
// the newest connection the host opened.
//
// Under QEMU there is one connection for the VM's life, the virtio-serial
// port (a node agent that restarts reconnects behind it). Under Firecracker
// every agent start opens a new vsock connection; init accepts each one
// and it replaces the previous one, so an agent that re-adopts a running VM
// receives the log and exit frames from then on, as it does under QEMU.
type Channel struct {
	mu     sync.Mutex
	cond   *sync.Cond
	cur    *chanConn // newest connection; nil before the first or after it failed
	greet  *Frame
	closed bool

	sendMu sync.Mutex // one frame at a time, whole, on one connection
}

type chanConn struct {
	rw io.ReadWriteCloser
	r  *Reader // set by Next when it starts reading rw
}

// NewChannel returns a channel without a connection.
func NewChannel() *Channel {
	c := &Channel{}
	c.cond = sync.NewCond(&c.mu)
	return c
}

// Accept makes rw the current connection and closes the previous one,
// which ends a read or write blocked on it: Next and Send go on with rw.
func (c *Channel) Accept(rw io.ReadWriteCloser) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		rw.Close()
		return
	}
	old := c.cur
	c.cur = &chanConn{rw: rw}
	c.cond.Broadcast()
	c.mu.Unlock()
	if old != nil {
		old.rw.Close()
	}
}

// Greet sets a frame that Next sends first on every connection it starts
// reading (nil: none). Init greets with ready until it has its
// configuration, so an agent that connects after another one went away
// before sending it is asked again.
func (c *Channel) Greet(f *Frame) {
	c.mu.Lock()
	c.greet = f
	c.mu.Unlock()
}

// Close closes the current connection; Next, Send and Accept fail from
// then on.
func (c *Channel) Close() error {
	c.mu.Lock()
	cur := c.cur
	c.cur, c.closed = nil, true
	c.cond.Broadcast()
	c.mu.Unlock()
	if cur != nil {
		return cur.rw.Close()
	}
	return nil
}

// current waits for a connection.
func (c *Channel) current() (*chanConn, *Frame, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.cur == nil && !c.closed {
		c.cond.Wait()
	}
	if c.closed {
		return nil, nil, ErrClosed
	}
	return c.cur, c.greet, nil
}

// drop closes cc after it failed; the channel waits for the next one.
func (c *Channel) drop(cc *chanConn) {
	c.mu.Lock()
	if c.cur == cc {
		c.cur = nil
	}
	c.mu.Unlock()
	cc.rw.Close()
}

// Next returns the next frame from the host: from the current connection,
// and once that ends, from the next one accepted. A malformed frame is
// returned as an error (errors.Is ErrBadFrame) and reading goes on after
// it. Next must not be called concurrently with itself.
func (c *Channel) Next() (*Frame, error) {
	for {
		cc, greet, err := c.current()
		if err != nil {
			return nil, err
		}
		if cc.r == nil {
			cc.r = NewReader(cc.rw)
			if greet != nil && c.sendOn(cc, greet) != nil {
				c.drop(cc)
				continue
			}
		}
		f, err := cc.r.Next()
		if err == nil || errors.Is(err, ErrBadFrame) {
			return f, err
		}
		c.drop(cc) // EOF or a broken stream: the host went away
	}
}

// Send writes f on the current connection, waiting for one. When the
// write fails the connection is dropped and f goes whole to the next one.
func (c *Channel) Send(f *Frame) error {
	b, err := encode(f)
	if err != nil {
		return err
	}
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	for {
		cc, _, err := c.current()
		if err != nil {
			return err
		}
		if _, err := cc.rw.Write(b); err == nil {
			return nil
		}
		c.drop(cc)
	}
}

func (c *Channel) sendOn(cc *chanConn, f *Frame) error {
	b, err := encode(f)
	if err != nil {
		return err
	}
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	_, err = cc.rw.Write(b)
	return err
}
