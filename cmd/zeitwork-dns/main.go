// Command zeitwork-dns is the authoritative GeoDNS server of the platform
// zones (DNS on :53 UDP and TCP, admin :8086).
package main

import (
	"context"
	"net/http"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/geodns"
	"github.com/zeitwork/zeitwork/internal/service"
)

func main() { service.Main("zeitwork-dns", run) }

func run(ctx context.Context, p *service.Process) error {
	env := envconfig.New()
	cfg := geodns.LoadServiceConfig(env)
	if err := env.Err(); err != nil {
		return err
	}
	zc, err := geodns.LoadFile(cfg.ConfigPath)
	if err != nil {
		return err
	}
	reg := service.NewRegistry("zeitwork_dns")
	srv, err := geodns.New(zc, reg, p.Logger)
	if err != nil {
		return err
	}
	if err := srv.Listen(cfg.Listen); err != nil {
		return err
	}
	health := service.NewHealth(p.Name)
	health.AddCheck("load_balancer_checks", func(context.Context) error { return srv.Ready() })
	health.SetInfo(srv.HealthInfo)
	mux := http.NewServeMux()
	health.Register(mux, reg)
	admin := &http.Server{Addr: cfg.AdminAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return srv.Run(gctx) })
	g.Go(func() error {
		// SIGHUP re-reads DNS_CONFIG; a bad file leaves the current one.
		for {
			select {
			case <-gctx.Done():
				health.SetDraining()
				return nil
			case <-p.Reload:
				if err := srv.ReloadFile(cfg.ConfigPath); err != nil {
					p.Logger.Error("config reload rejected; the previous configuration stays", "err", err)
					continue
				}
				p.Logger.Info("config reloaded", "path", cfg.ConfigPath)
			}
		}
	})
	adminCtx, stopAdmin := context.WithCancel(context.Background())
	defer stopAdmin()
	adminDone := make(chan error, 1)
	go func() { adminDone <- service.ListenAndServe(adminCtx, admin, cfg.AdminAddr, 5*time.Second) }()
	p.Logger.Info("listening", "dns", srv.Addr(), "admin", cfg.AdminAddr, "config", cfg.ConfigPath)
	_ = service.NotifyReady()
	err = g.Wait()
	_ = service.NotifyStopping()
	stopAdmin()
	if aerr := <-adminDone; err == nil {
		err = aerr
	}
	return err
}
