package guest

import (
	"context"
	"fmt"
	"net"
	"time"
)

// Dial connects to a machine's agent socket, retrying until ctx ends (the
// VMM creates the socket before the guest is up).
func Dial(ctx context.Context, socket string) (net.Conn, error) {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", socket)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("cannot connect to agent channel %s: %w", socket, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
