// Command zeitwork-node-agent runs on every worker: it boots and supervises
// the microVMs the operator places on this node, and keeps the node's data
// plane process (`zeitwork-node-agent dataplane serve`, :8081) running,
// which proxies edge traffic to the VMs and the API to the agent.
//
// Subcommands: `dataplane serve` (started by the agent) and `dataplane
// stop` (stops the node's data plane, e.g. to decommission the node).
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/zeitwork/zeitwork/internal/dataplane"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/nodeagent"
	"github.com/zeitwork/zeitwork/internal/service"
)

func main() { service.Main("zeitwork-node-agent", run) }

func run(ctx context.Context, p *service.Process) error {
	if len(p.Args) > 0 && p.Args[0] == "dataplane" {
		return runDataPlane(ctx, p, p.Args[1:])
	}
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
	// The agent serves its API on a Unix socket; the data plane process
	// owns the node's port and forwards to it.
	sock := dataplane.PathsFor(cfg.WorkDir).AgentSocket
	_ = os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %w", sock, err)
	}
	if err := os.Chmod(sock, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("cannot restrict %s: %w", sock, err)
	}
	srv := &http.Server{Handler: agent.Handler(admin), ReadHeaderTimeout: 10 * time.Second}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return service.Serve(gctx, srv, ln, 15*time.Second) })
	sp := dataplane.Spawn{WorkDir: cfg.WorkDir, Addr: cfg.Addr, Log: p.Logger.With("component", "dataplane")}
	pid, _, err := dataplane.Ensure(ctx, sp, true)
	if err != nil {
		ln.Close()
		_ = g.Wait()
		return err
	}
	g.Go(func() error { return agent.Run(gctx) })
	g.Go(func() error { return dataplane.Keep(gctx, sp, pid, 5*time.Second) })
	p.Logger.Info("listening", "addr", cfg.Addr, "advertise", cfg.Advertise, "socket", sock, "dataplane_pid", pid)
	_ = service.NotifyReady()
	return g.Wait()
}

// runDataPlane is `zeitwork-node-agent dataplane serve|stop`.
func runDataPlane(ctx context.Context, p *service.Process, args []string) error {
	sub := "serve"
	if len(args) > 0 {
		sub = args[0]
	}
	log := p.Logger.With("component", "dataplane")
	switch sub {
	case "serve":
		env := envconfig.New()
		cfg := nodeagent.LoadConfig(env)
		if err := env.Err(); err != nil {
			return err
		}
		return dataplane.Serve(ctx, dataplane.ProcessConfig{WorkDir: cfg.WorkDir, Addr: cfg.Addr, Token: cfg.Token}, log)
	case "stop":
		env := envconfig.New()
		dir := env.String("VM_WORK_DIR", "/var/lib/zeitwork")
		if err := env.Err(); err != nil {
			return err
		}
		return dataplane.Stop(dir, 30*time.Second)
	default:
		return fmt.Errorf("unknown subcommand dataplane %s (serve, stop)", sub)
	}
}
