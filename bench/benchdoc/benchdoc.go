// Package benchdoc records benchmark results in docs/benchmarks.md, each
// benchmark owning one section between HTML comment markers.
package benchdoc

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Write replaces the section named name in docs/benchmarks.md (found by
// walking up from the working directory) with body.
func Write(name, body string) error {
	dir, _ := os.Getwd()
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return fmt.Errorf("cannot find the repository root")
		}
		dir = parent
	}
	path := filepath.Join(dir, "docs", "benchmarks.md")
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	doc := string(old)
	if doc == "" {
		doc = "# Benchmarks\n\nEach section is rewritten by its `make bench-*` target. Figures are ratios against a peer measured in the same run on the same machine; absolute numbers depend on the machine.\n"
	}
	begin, end := "<!-- bench:"+name+":begin -->", "<!-- bench:"+name+":end -->"
	section := begin + "\n" + strings.TrimSpace(body) + "\n" + end
	if i, j := strings.Index(doc, begin), strings.Index(doc, end); i >= 0 && j > i {
		doc = doc[:i] + section + doc[j+len(end):]
	} else {
		doc = strings.TrimRight(doc, "\n") + "\n\n" + section + "\n"
	}
	return os.WriteFile(path, []byte(doc), 0o644)
}
