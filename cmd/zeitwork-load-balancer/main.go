// Command zeitwork-load-balancer is the L4 TCP load balancer in front of a
// region's edge proxies (public :8082, admin :8084).
package main

import (
	"context"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/handover"
	"github.com/zeitwork/zeitwork/internal/lb"
	"github.com/zeitwork/zeitwork/internal/service"
)

func main() { service.Main("zeitwork-load-balancer", run) }

func run(ctx context.Context, p *service.Process) error {
	env := envconfig.New()
	cfg := lb.LoadServiceConfig(env)
	if err := env.Err(); err != nil {
		return err
	}
	// SIGUSR2 starts the binary installed at this path with the listening
	// sockets; once it serves, this process drains and exits.
	ho, err := handover.New(p.Logger)
	if err != nil {
		return err
	}
	cfg.LB.Sockets = ho
	reg := service.NewRegistry("zeitwork_load_balancer")
	balancer, err := lb.New(cfg.LB, reg, p.Logger)
	if err != nil {
		return err
	}
	adminLn, err := ho.Listen("admin:"+cfg.AdminAddr, func() (net.Listener, error) { return net.Listen("tcp", cfg.AdminAddr) })
	if err != nil {
		return err
	}
	balancer.SetBackends(cfg.Backends)
	health := service.NewHealth(p.Name)
	health.SetInfo(balancer.HealthInfo)
	health.AddCheck("edges", balancer.Ready)
	mux := http.NewServeMux()
	health.Register(mux, reg)
	balancer.Register(mux)
	admin := &http.Server{Addr: cfg.AdminAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	disc := &lb.Discovery{Operators: cfg.Operators, Region: cfg.Region, Token: cfg.Token, Interval: cfg.Discover, Static: cfg.Backends, Log: p.Logger}

	ctx, handedOver := context.WithCancel(ctx)
	defer handedOver()
	var upgraded atomic.Bool
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return ho.Run(gctx, func() { upgraded.Store(true); handedOver() }) })
	g.Go(func() error { return balancer.Run(gctx) })
	// SIGHUP asks the operators for the edge list at once.
	g.Go(func() error { return disc.Run(gctx, balancer, p.Reload) })
	adminCtx, stopAdmin := context.WithCancel(context.Background())
	defer stopAdmin()
	g.Go(func() error {
		// The admin server outlives the drain so /health shows it, unless
		// the next process took over: then it answers at once.
		<-gctx.Done()
		health.SetDraining()
		if upgraded.Load() {
			stopAdmin()
		}
		return nil
	})
	adminDone := make(chan error, 1)
	go func() { adminDone <- service.Serve(adminCtx, admin, adminLn, 5*time.Second) }()
	p.Logger.Info("listening", "listeners", cfg.LB.Listeners, "admin", cfg.AdminAddr, "algorithm", cfg.LB.Algorithm)
	_ = service.NotifyReady()
	if err := ho.Ready(); err != nil {
		p.Logger.Warn("upgrade handover", "err", err)
	}
	err = g.Wait()
	if !upgraded.Load() { // after a handover systemd's main process is the new one
		_ = service.NotifyStopping()
	}
	stopAdmin()
	if aerr := <-adminDone; err == nil {
		err = aerr
	}
	return err
}
