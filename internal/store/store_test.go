package store

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestQueriesUsed checks that every Q("Name") in the operator names a query
// in the .sql files, and that every query is used somewhere: a typo panics
// at run time otherwise, and dead SQL rots.
func TestQueriesUsed(t *testing.T) {
	use := regexp.MustCompile(`\bQ\("([A-Za-z0-9_]+)"\)`)
	used := map[string]bool{}
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range use.FindAllStringSubmatch(string(b), -1) {
			used[m[1]] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// A promotion's steps are named in a table rather than Q("…") calls.
	for _, name := range []string{"ProjectLock", "DeploymentSupersede", "ProjectSetActive", "DeploymentSetStatus", "PromoteRequestClear", "BumpRoutes"} { // see Promote
		used[name] = true
	}
	known := map[string]bool{}
	for _, n := range Names() {
		known[n] = true
		if !used[n] {
			t.Errorf("query %s is never used", n)
		}
	}
	for n := range used {
		if !known[n] {
			t.Errorf("Q(%q) names no query", n)
		}
	}
}

func TestParse(t *testing.T) {
	qs, err := Parse("-- name: A\nSELECT 1;\n\n-- name: B\n-- a comment\nSELECT 2\n")
	if err != nil || qs["A"] != "SELECT 1" || !strings.HasSuffix(qs["B"], "SELECT 2") {
		t.Fatalf("%v %v", qs, err)
	}
	for _, bad := range []string{"-- name: A\n", "-- name: A\nSELECT 1;\n-- name: A\nSELECT 2;"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add("-- name: A\nSELECT 1;\n")
	f.Fuzz(func(t *testing.T, src string) {
		qs, err := Parse(src)
		if err != nil {
			return
		}
		for name, q := range qs {
			if name == "" || strings.TrimSpace(q) == "" || !strings.Contains(src, q) {
				t.Fatalf("query %q = %q", name, q)
			}
		}
	})
}
