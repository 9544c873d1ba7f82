// Package service is the process shell every Zeitwork daemon shares: the
// --version flag, JSON logging, signal handling (SIGTERM/SIGINT drain and
// exit, SIGHUP reload), systemd readiness notification, and the health and
// metrics endpoints.
//
// A daemon's main is one line:
//
//	func main() { service.Main("zeitwork-edge-proxy", run) }
//
// where run builds its components from the environment and blocks until the
// context ends.
package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/zeitwork/zeitwork/internal/buildinfo"
)

// Process is what Main hands to a daemon's run function.
type Process struct {
	Name   string
	Args   []string // command-line arguments after the binary name
	Logger *slog.Logger
	// Reload receives one value per SIGHUP. Whoever owns reloadable state
	// reads it; Main never blocks sending to it.
	Reload <-chan struct{}
}

// RunFunc is a daemon's body. It returns when ctx ends (after draining) or
// on a fatal error.
type RunFunc func(ctx context.Context, p *Process) error

// Main runs fn as the process body and exits with its result.
func Main(name string, fn RunFunc) {
	os.Exit(run(name, os.Args[1:], os.Stdout, os.Stderr, fn))
}

func run(name string, args []string, stdout, stderr io.Writer, fn RunFunc) int {
	for _, a := range args {
		switch a {
		case "--version", "-version", "version":
			fmt.Fprintln(stdout, buildinfo.String(name))
			return 0
		case "--help", "-h", "help":
			fmt.Fprintf(stdout, "%s: configured from environment variables; see /etc/zeitwork/%s.env\nflags: --version\n", name, strings.TrimPrefix(name, "zeitwork-"))
			return 0
		}
	}
	logger := NewLogger(stderr, os.Getenv("LOG_LEVEL")).With("service", name)
	slog.SetDefault(logger)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reload := make(chan struct{}, 1)
	go func() { // owned by this function: ends when ctx ends
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				select {
				case reload <- struct{}{}:
				default:
				}
			}
		}
	}()

	err := fn(ctx, &Process{Name: name, Args: args, Logger: logger, Reload: reload})
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		logger.Error("exiting", "err", err)
		return 1
	}
	logger.Info("stopped")
	return 0
}

// NewLogger returns a JSON slog logger at the named level (debug, info,
// warn, error; default info).
func NewLogger(w io.Writer, level string) *slog.Logger {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(strings.TrimSpace(level))); err != nil {
		lv = slog.LevelInfo
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: lv}))
}

// NotifyReady tells systemd (Type=notify) that the service is ready. It does
// nothing when NOTIFY_SOCKET is unset.
func NotifyReady() error { return sdNotify("READY=1") }

// NotifyStopping tells systemd that the service is draining.
func NotifyStopping() error { return sdNotify("STOPPING=1") }

func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("cannot notify systemd: %w", err)
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err
}
