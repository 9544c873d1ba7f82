// Package cli implements the `zeitwork` command line. It talks to the
// operator's HTTP API only and links no server code, so the binary stays
// small and safe to hand to users.
package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/zeitwork/zeitwork/internal/buildinfo"
)

// Exit codes scripts can rely on.
const (
	ExitOK       = 0
	ExitFailure  = 1
	ExitUsage    = 2
	ExitAuth     = 3
	ExitNotFound = 4
)

// exitError carries an exit code and a hint.
type exitError struct {
	code int
	err  error
	hint string
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// Main runs the CLI and returns the process exit code.
func Main(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.Execute()
	if err == nil {
		return ExitOK
	}
	code, hint := ExitFailure, ""
	var ee *exitError
	if errors.As(err, &ee) {
		code, hint = ee.code, ee.hint
	} else if isUsage(err) {
		code, hint = ExitUsage, "run 'zeitwork --help' for usage"
	}
	fmt.Fprintf(stderr, "error: %v\n", err)
	if hint != "" {
		fmt.Fprintf(stderr, "hint: %s\n", hint)
	}
	return code
}

type usageError struct{ error }

func isUsage(err error) bool {
	var u usageError
	return errors.As(err, &u)
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "zeitwork",
		Short:         "Deploy containerized apps to Zeitwork microVMs",
		Version:       buildinfo.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetVersionTemplate(buildinfo.String("zeitwork") + "\n")
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(devCommand())
	addCommands(root, &app{stdout: stdout, stderr: stderr})
	return root
}

// devCommand runs the whole platform on this machine. The orchestration
// (embedded PostgreSQL, registry, processes) needs server code, so it
// lives in zeitwork-operator; this command execs it from beside itself.
func devCommand() *cobra.Command {
	return &cobra.Command{
		Use:                "dev",
		Short:              "Run the whole platform on this machine (PostgreSQL, operator, node agent, edge proxy, load balancer)",
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			self, err := os.Executable()
			if err != nil {
				return err
			}
			op := filepath.Join(filepath.Dir(self), "zeitwork-operator")
			if _, err := os.Stat(op); err != nil {
				if op, err = exec.LookPath("zeitwork-operator"); err != nil {
					return &exitError{code: ExitFailure, err: errors.New("zeitwork-operator not found next to zeitwork or on PATH"), hint: "run make build"}
				}
			}
			return syscall.Exec(op, append([]string{op, "dev"}, args...), os.Environ())
		},
	}
}
