// Command zeitwork-topology runs Zeitwork's production layout (3 regions ×
// (3 operators + 6 workers), GeoDNS, PostgreSQL) on this machine as
// network namespaces (internal/topology). `make topology` runs it.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/zeitwork/zeitwork/internal/topology"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := topology.Run(ctx, os.Args[1:], log); err != nil {
		fmt.Fprintln(os.Stderr, "zeitwork-topology:", err)
		stop()
		os.Exit(1)
	}
}
