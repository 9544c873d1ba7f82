// Command zeitwork is the Zeitwork user CLI: log in, create projects,
// deploy images, follow logs, manage domains and environment variables, and
// run the whole platform on this machine with `zeitwork dev`.
package main

import (
	"os"

	"github.com/zeitwork/zeitwork/internal/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }
