// Command zeitwork-edge-proxy is the HTTP(S) front door of a region: TLS
// termination, per-IP rate limiting and Host routing to node agents
// (:443 HTTPS, :8083 HTTP).
package main

import (
	"context"
	"net"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/zeitwork/zeitwork/internal/edge"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/handover"
	"github.com/zeitwork/zeitwork/internal/service"
)

func main() { service.Main("zeitwork-edge-proxy", run) }

// acceptGrace is how long an edge that handed its sockets over waits
// between its last accepted connection and its drain.
const acceptGrace = time.Second

// gated hands the edge listeners that stop accepting without ending the
// servers' accept loops (handover.ListenGated).
type gated struct{ *handover.Handover }

func (g gated) Listen(key string, bind func() (net.Listener, error)) (net.Listener, error) {
	return g.ListenGated(key, bind)
}

func run(ctx context.Context, p *service.Process) error {
	env := envconfig.New()
	cfg := edge.LoadServiceConfig(env)
	if err := env.Err(); err != nil {
		return err
	}
	// SIGUSR2 starts the binary installed at this path with the listening
	// sockets; once it serves, this process drains and exits.
	ho, err := handover.New(p.Logger)
	if err != nil {
		return err
	}
	cfg.Sockets = gated{ho}
	reg := service.NewRegistry("zeitwork_edge_proxy")
	health := service.NewHealth(p.Name)
	srv, err := edge.NewServer(ctx, cfg, reg, health, p.Logger)
	if err != nil {
		return err
	}
	https, http := srv.Addrs()
	p.Logger.Info("listening", "https", https.String(), "http", http.String())
	ctx, handedOver := context.WithCancel(ctx)
	defer handedOver()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		return ho.Run(gctx, func() {
			// The new process accepts from here on. Connections this one
			// accepted a moment ago are still in their TLS handshake or
			// first request, which the drain would take for idle and
			// close: give them time to become busy first.
			ho.StopAccepting()
			select {
			case <-gctx.Done():
			case <-time.After(acceptGrace):
			}
			handedOver()
		})
	})
	g.Go(func() error { return srv.Run(gctx, p.Reload) })
	_ = service.NotifyReady()
	if err := ho.Ready(); err != nil {
		p.Logger.Warn("upgrade handover", "err", err)
	}
	return g.Wait()
}
