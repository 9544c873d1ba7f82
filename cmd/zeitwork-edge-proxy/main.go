// Command zeitwork-edge-proxy is the HTTP(S) front door of a region: TLS
// termination, per-IP rate limiting and Host routing to node agents
// (:443 HTTPS, :8083 HTTP).
package main

import (
	"context"

	"github.com/zeitwork/zeitwork/internal/edge"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/service"
)

func main() { service.Main("zeitwork-edge-proxy", run) }

func run(ctx context.Context, p *service.Process) error {
	env := envconfig.New()
	cfg := edge.LoadServiceConfig(env)
	if err := env.Err(); err != nil {
		return err
	}
	reg := service.NewRegistry("zeitwork_edge_proxy")
	health := service.NewHealth(p.Name)
	srv, err := edge.NewServer(ctx, cfg, reg, health, p.Logger)
	if err != nil {
		return err
	}
	https, http := srv.Addrs()
	p.Logger.Info("listening", "https", https.String(), "http", http.String())
	_ = service.NotifyReady()
	return srv.Run(ctx, p.Reload)
}
