// Package buildinfo holds the version and commit stamped into every binary
// at link time (see the Makefile's LDFLAGS).
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Set with -ldflags "-X github.com/zeitwork/zeitwork/internal/buildinfo.Version=…".
var (
	Version = "dev"
	Commit  = ""
)

// CommitOrUnknown returns the commit the binary was built from, falling back
// to the VCS information the Go toolchain records.
func CommitOrUnknown() string {
	if Commit != "" {
		return Commit
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && s.Value != "" {
				return s.Value
			}
		}
	}
	return "unknown"
}

// String is the line every binary prints for --version.
func String(binary string) string {
	return fmt.Sprintf("%s %s (commit %s, %s, %s/%s)", binary, Version, CommitOrUnknown(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
