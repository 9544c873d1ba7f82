package guest

import (
	"context"
	"fmt"
	"net"
	"time"
)

// Dial opens the host end of the agent channel with dial (a VMM's
// Machine.DialAgent), retrying until ctx ends: the VMM's socket exists
// before the guest's init is listening, and a hybrid vsock connection is
// refused until then.
func Dial(ctx context.Context, dial func(context.Context) (net.Conn, error)) (net.Conn, error) {
	for {
		c, err := dial(ctx)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("cannot connect to the agent channel: %w", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
