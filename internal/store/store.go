// Package store holds the operator's SQL: every query lives in a .sql file
// under queries/, named with a "-- name: X" line, embedded in the binary and
// looked up by name. Queries are plain pgx, with no ORM, so what runs
// against PostgreSQL is exactly what the file says (see
// docs/adr/0004-sql-in-files.md).
package store

import (
	"embed"
	"fmt"
	"io/fs"
	"regexp"
	"sort"
	"strings"
)

//go:embed queries/*.sql
var queriesFS embed.FS

var queries = mustLoad()

var nameLine = regexp.MustCompile(`(?m)^--\s*name:\s*([A-Za-z0-9_]+)\s*$`)

// Parse splits a .sql file into named queries.
func Parse(src string) (map[string]string, error) {
	out := map[string]string{}
	locs := nameLine.FindAllStringSubmatchIndex(src, -1)
	for i, loc := range locs {
		name := src[loc[2]:loc[3]]
		end := len(src)
		if i+1 < len(locs) {
			end = locs[i+1][0]
		}
		body := strings.TrimSpace(src[loc[1]:end])
		body = strings.TrimSuffix(body, ";")
		if body == "" {
			return nil, fmt.Errorf("query %s is empty", name)
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("query %s is defined twice", name)
		}
		out[name] = body
	}
	return out, nil
}

func mustLoad() map[string]string {
	all := map[string]string{}
	files, _ := fs.Glob(queriesFS, "queries/*.sql")
	sort.Strings(files)
	for _, f := range files {
		b, _ := queriesFS.ReadFile(f)
		qs, err := Parse(string(b))
		if err != nil {
			panic(fmt.Sprintf("%s: %v", f, err))
		}
		for k, v := range qs {
			if _, dup := all[k]; dup {
				panic(fmt.Sprintf("query %s defined in two files", k))
			}
			all[k] = v
		}
	}
	return all
}

// Q returns the named query; an unknown name is a programming error.
func Q(name string) string {
	q, ok := queries[name]
	if !ok {
		panic("store: unknown query " + name)
	}
	return q
}

// Names lists every query name (for tests).
func Names() []string {
	var out []string
	for k := range queries {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
