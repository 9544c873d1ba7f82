// Command zeitwork-node-agent runs on every worker: it boots and supervises
// the microVMs the operator places on this node and proxies edge traffic
// to them (:8081).
package main

import (
	"context"
	"net/http"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/nodeagent"
	"github.com/zeitwork/zeitwork/internal/service"
)

func main() { service.Main("zeitwork-node-agent", run) }

func run(ctx context.Context, p *service.Process) error {
	env := envconfig.New()
	cfg := nodeagent.LoadConfig(env)
	if err := env.Err(); err != nil {
		return err
	}
	reg := service.NewRegistry("zeitwork_node_agent")
	agent, err := nodeagent.New(ctx, cfg, reg, p.Logger)
	if err != nil {
		return err
	}
	health := service.NewHealth(p.Name)
	health.SetInfo(func() map[string]any {
		return map[string]any{"node_id": agent.NodeID(), "instances": len(agent.List())}
	})
	admin := http.NewServeMux()
	health.Register(admin, reg)
	srv := &http.Server{Handler: agent.Handler(admin), ReadHeaderTimeout: 10 * time.Second}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return agent.Run(gctx) })
	g.Go(func() error { return service.ListenAndServe(gctx, srv, cfg.Addr, 15*time.Second) })
	p.Logger.Info("listening", "addr", cfg.Addr, "advertise", cfg.Advertise)
	_ = service.NotifyReady()
	return g.Wait()
}
