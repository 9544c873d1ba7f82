// Command zeitwork-operator is Zeitwork's control plane: the API, GitHub
// webhooks, the deployment reconciler and the route table, backed by
// PostgreSQL. `zeitwork-operator migrate` applies the schema and exits.
package main

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/service"
)

func main() { service.Main("zeitwork-operator", run) }

type config struct {
	Addr        string
	DatabaseURL string
	Drain       time.Duration
}

func loadConfig() (config, error) {
	l := envconfig.New()
	c := config{
		Addr:        l.Addr("PORT", ":8080"),
		DatabaseURL: l.Required("DATABASE_URL", "the operator keeps cluster state in PostgreSQL"),
		Drain:       l.Duration("DRAIN_TIMEOUT", 20*time.Second),
	}
	if a := l.String("LISTEN_ADDR", ""); a != "" {
		c.Addr = l.Addr("LISTEN_ADDR", a)
	}
	return c, l.Err()
}

func run(ctx context.Context, p *service.Process) error {
	cfg, err := loadConfig()
	if err != nil {
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
	if len(p.Args) > 0 && p.Args[0] == "migrate" {
		fmt.Printf("schema up to date (%d applied now)\n", len(applied))
		return nil
	}
	health := service.NewHealth(p.Name)
	health.AddCheck("database", func(ctx context.Context) error { return pool.Ping(ctx) })
	reg := service.NewRegistry("zeitwork_operator")
	mux := http.NewServeMux()
	health.Register(mux, reg)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	p.Logger.Info("listening", "addr", cfg.Addr)
	_ = service.NotifyReady()
	return service.ListenAndServe(ctx, srv, cfg.Addr, cfg.Drain)
}
