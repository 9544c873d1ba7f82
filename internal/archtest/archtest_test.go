package archtest

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

type pkg struct {
	ImportPath string
	Doc        string
	Name       string
	GoFiles    []string
	Deps       []string
}

func goList(t *testing.T, args ...string) []pkg {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list", "-json"}, args...)...)
	cmd.Dir = "../.."
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(out)
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("go list: %v", err)
	}
	return pkgs
}

// TestEveryPackageIsDocumented fails on a package without a doc comment.
func TestEveryPackageIsDocumented(t *testing.T) {
	for _, p := range goList(t, "./...") {
		if len(p.GoFiles) == 0 {
			continue
		}
		if strings.TrimSpace(p.Doc) == "" {
			t.Errorf("package %s has no doc comment", p.ImportPath)
		}
	}
}

// TestCLILinksNoServerCode keeps the user CLI free of the PostgreSQL driver,
// netlink and ACME code.
func TestCLILinksNoServerCode(t *testing.T) {
	forbidden := []string{
		"github.com/jackc/pgx",
		"github.com/vishvananda/netlink",
		"github.com/caddyserver/certmagic",
		"github.com/mholt/acmez",
		"github.com/letsencrypt/pebble",
		"github.com/zeitwork/zeitwork/internal/db",
		"github.com/zeitwork/zeitwork/internal/operator",
		"github.com/zeitwork/zeitwork/internal/nodeagent",
		"github.com/zeitwork/zeitwork/internal/edge",
		"github.com/zeitwork/zeitwork/internal/lb",
	}
	pkgs := goList(t, "-deps=false", "./cmd/zeitwork")
	if len(pkgs) != 1 {
		t.Fatalf("go list returned %d packages", len(pkgs))
	}
	for _, d := range pkgs[0].Deps {
		for _, f := range forbidden {
			if d == f || strings.HasPrefix(d, f+"/") {
				t.Errorf("cmd/zeitwork links %s", d)
			}
		}
	}
}
