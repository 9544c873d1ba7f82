// Command zeitwork-operator is Zeitwork's control plane: the API, GitHub
// webhooks, the deployment reconciler and the route table, backed by
// PostgreSQL (:8080).
//
//	zeitwork-operator                     serve (migrates first)
//	zeitwork-operator migrate             apply the schema and exit
//	zeitwork-operator bootstrap --org ORG --email EMAIL [--token TOKEN]
//	                                      create the organisation and its owner if absent and
//	                                      print an API token: TOKEN (or $BOOTSTRAP_TOKEN) when
//	                                      given, which makes it idempotent, else a new one
//	                                      ("bootstrap ORG EMAIL" works too)
//	zeitwork-operator dev                 run the whole platform on this machine
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
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
	if len(p.Args) == 0 {
		cfg.RequireBootstrapOwner(env)
	}
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
			org, email, token, err := bootstrapArgs(p.Args[1:], cfg.BootstrapToken)
			if err != nil {
				return err
			}
			op, err := operator.New(cfg, pool, nil, p.Logger)
			if err != nil {
				return err
			}
			if token == "" {
				token, err = op.Bootstrap(ctx, org, email, "bootstrap")
			} else {
				err = op.BootstrapToken(ctx, org, email, "bootstrap", token)
			}
			if err != nil {
				return fmt.Errorf("cannot bootstrap %s: %w", org, err)
			}
			fmt.Println(token)
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
	if cfg.BootstrapToken != "" {
		if err := op.BootstrapToken(ctx, cfg.BootstrapOrg, cfg.BootstrapEmail, "bootstrap", cfg.BootstrapToken); err != nil {
			return fmt.Errorf("cannot ensure BOOTSTRAP_TOKEN: %w", err)
		}
	}
	health := service.NewHealth(p.Name)
	health.AddCheck("database", func(ctx context.Context) error { return pool.Ping(ctx) })
	admin := http.NewServeMux()
	health.Register(admin, reg)
	srv := &http.Server{Handler: op.Handler(admin), ReadHeaderTimeout: 10 * time.Second}
	srv.RegisterOnShutdown(op.EndLongPolls)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return op.Run(gctx) })
	g.Go(func() error { return service.ListenAndServe(gctx, srv, cfg.Addr, cfg.Drain) })
	p.Logger.Info("listening", "addr", cfg.Addr)
	_ = service.NotifyReady()
	return g.Wait()
}

// bootstrapArgs reads "--org O --email E [--token T]" or "O E"; the token
// defaults to BOOTSTRAP_TOKEN.
func bootstrapArgs(args []string, envToken string) (org, email, token string, err error) {
	fs := flag.NewFlagSet("bootstrap", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&org, "org", "", "organisation name (a DNS label)")
	fs.StringVar(&email, "email", "", "owner's email address")
	fs.StringVar(&token, "token", envToken, "API token to ensure (default $BOOTSTRAP_TOKEN; a new one when empty)")
	usage := errors.New("usage: zeitwork-operator bootstrap --org ORG --email EMAIL [--token TOKEN]")
	if err := fs.Parse(args); err != nil {
		return "", "", "", fmt.Errorf("%w (%v)", usage, err)
	}
	if rest := fs.Args(); len(rest) == 2 && org == "" && email == "" {
		org, email = rest[0], rest[1]
	} else if len(rest) != 0 {
		return "", "", "", usage
	}
	if org == "" || email == "" {
		return "", "", "", usage
	}
	return org, email, token, nil
}
