// Command zeitwork-operator is Zeitwork's control plane: the API, GitHub
// webhooks, the deployment reconciler and the route table, backed by
// PostgreSQL (:8080).
//
//	zeitwork-operator                     serve (migrates first)
//	zeitwork-operator migrate             apply the schema and exit
//	zeitwork-operator bootstrap ORG EMAIL create an organisation and print a new API token
//	zeitwork-operator dev                 run the whole platform on this machine
package main

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/devcluster"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/operator"
	"github.com/zeitwork/zeitwork/internal/service"
)

func main() { service.Main("zeitwork-operator", run) }

func run(ctx context.Context, p *service.Process) error {
	if len(p.Args) > 0 && p.Args[0] == "dev" {
		return devcluster.RunDev(ctx, p.Args[1:], p.Logger)
	}
	env := envconfig.New()
	cfg := operator.LoadConfig(env)
	if len(p.Args) > 0 && p.Args[0] == "migrate" {
		if cfg.DatabaseURL == "" {
			return env.Err()
		}
	} else if err := env.Err(); err != nil {
		return err
	}
	pool, err := db.Open(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer pool.Close()
	applied, err := db.Migrate(ctx, pool)
	if err != nil {
		return err
	}
	if len(applied) > 0 {
		p.Logger.Info("applied migrations", "versions", applied)
	}
	if len(p.Args) > 0 {
		switch p.Args[0] {
		case "migrate":
			fmt.Printf("schema up to date (%d migrations applied now)\n", len(applied))
			return nil
		case "bootstrap":
			if len(p.Args) != 3 {
				return fmt.Errorf("usage: zeitwork-operator bootstrap ORG EMAIL")
			}
			op, err := operator.New(cfg, pool, nil, p.Logger)
			if err != nil {
				return err
			}
			tok, err := op.Bootstrap(ctx, p.Args[1], p.Args[2], "bootstrap")
			if err != nil {
				return err
			}
			fmt.Println(tok)
			return nil
		default:
			return fmt.Errorf("unknown command %q (want migrate, bootstrap or dev)", p.Args[0])
		}
	}
	reg := service.NewRegistry("zeitwork_operator")
	op, err := operator.New(cfg, pool, reg, p.Logger)
	if err != nil {
		return err
	}
	health := service.NewHealth(p.Name)
	health.AddCheck("database", func(ctx context.Context) error { return pool.Ping(ctx) })
	admin := http.NewServeMux()
	health.Register(admin, reg)
	srv := &http.Server{Handler: op.Handler(admin), ReadHeaderTimeout: 10 * time.Second}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return op.Run(gctx) })
	g.Go(func() error { return service.ListenAndServe(gctx, srv, cfg.Addr, cfg.Drain) })
	p.Logger.Info("listening", "addr", cfg.Addr)
	_ = service.NotifyReady()
	return g.Wait()
}
