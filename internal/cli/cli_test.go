package cli

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseDotenv(t *testing.T) {
	got, err := ParseDotenv("# comment\nA=1\nexport B = two words # trailing\nC='lit #x'\nD=\"a\\nb\"\n\nE=\n")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"A": "1", "B": "two words", "C": "lit #x", "D": "a\nb", "E": ""}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	for _, bad := range []string{"NOEQUALS", "1X=2", "A=\"open", "A B=1"} {
		if _, err := ParseDotenv(bad); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

func FuzzParseDotenv(f *testing.F) {
	f.Add("A=1\nB='x'\nC=\"y\\n\"\n# c\n")
	f.Fuzz(func(t *testing.T, s string) {
		m, err := ParseDotenv(s)
		if err != nil {
			return
		}
		for k := range m {
			if !envKeyRE.MatchString(k) {
				t.Fatalf("bad key %q accepted", k)
			}
		}
	})
}

// TestCommands runs commands against a fake operator: login stores the
// token 0600, listings print tables or JSON, errors exit with the right
// codes.
func TestCommands(t *testing.T) {
	op := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer good" {
			w.WriteHeader(401)
			_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"code": "unauthorized", "message": "invalid or revoked token"}})
			return
		}
		switch r.URL.Path {
		case "/api/v1/whoami":
			_ = json.NewEncoder(w).Encode(map[string]any{"organisation": "acme"})
		case "/api/v1/projects":
			_ = json.NewEncoder(w).Encode(map[string]any{"projects": []map[string]any{{"name": "web", "min_instances_per_region": 3, "production_url": "https://web-acme.zeitwork.test"}}})
		case "/api/v1/projects/missing/deployments":
			w.WriteHeader(404)
			_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"code": "not_found", "message": "project missing not found"}})
		default:
			w.WriteHeader(404)
		}
	}))
	defer op.Close()
	dir := t.TempDir()
	t.Setenv("ZEITWORK_CONFIG", filepath.Join(dir, "config.json"))
	t.Setenv("ZEITWORK_TOKEN", "")
	t.Setenv("ZEITWORK_API_URL", "")
	run := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := Main(args, strings.NewReader(""), &out, &errb)
		return code, out.String(), errb.String()
	}
	if code, _, errs := run("whoami"); code != ExitAuth || !strings.Contains(errs, "hint:") {
		t.Fatalf("not logged in: %d %s", code, errs)
	}
	if code, _, errs := run("login", "--api-url", op.URL, "--token", "bad"); code != ExitAuth {
		t.Fatalf("bad token login: %d %s", code, errs)
	}
	if code, _, errs := run("login", "--api-url", op.URL, "--token", "good"); code != 0 {
		t.Fatalf("login: %d %s", code, errs)
	}
	fi, err := os.Stat(filepath.Join(dir, "config.json"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("config file: %v %v", fi, err)
	}
	if code, out, _ := run("whoami"); code != 0 || out != "acme\n" {
		t.Fatalf("whoami: %d %q", code, out)
	}
	if code, out, _ := run("projects", "ls"); code != 0 || !strings.Contains(out, "NAME") || !strings.Contains(out, "web") {
		t.Fatalf("projects ls: %d %q", code, out)
	}
	code, out, _ := run("projects", "ls", "--json")
	var v map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &v) != nil {
		t.Fatalf("--json: %d %q", code, out)
	}
	if code, _, errs := run("deploy", "--project", "missing", "--image", "x"); code != ExitNotFound || !strings.HasPrefix(errs, "deployment") && !strings.Contains(errs, "error: project missing not found") {
		t.Fatalf("not found: %d %q", code, errs)
	}
	if code, _, _ := run("deploy", "--bogus"); code != ExitUsage {
		t.Fatalf("bad flag: %d", code)
	}
	if code, _, _ := run("--token", "bad", "whoami"); code != ExitAuth {
		t.Fatal("--token does not override the stored token")
	}
}
