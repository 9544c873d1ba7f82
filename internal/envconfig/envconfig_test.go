package envconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoaderReportsEveryBadVariable(t *testing.T) {
	l := FromMap(map[string]string{
		"PORT":          "http",
		"LB_ALGORITHM":  "random",
		"RATE_LIMIT":    "-3",
		"DRAIN":         "soon",
		"ENABLED":       "maybe",
		"OPERATOR_URL":  "http://a:8080, ftp://b",
		"SSL_CERT_PATH": filepath.Join(t.TempDir(), "missing.pem"),
	})
	_ = l.Addr("PORT", ":8080")
	_ = l.Enum("LB_ALGORITHM", "round-robin", "round-robin", "least-connections", "ip-hash")
	_ = l.Float("RATE_LIMIT", 10)
	_ = l.Duration("DRAIN", time.Second)
	_ = l.Bool("ENABLED", false)
	urls := l.URLs("OPERATOR_URL", nil)
	_ = l.File("SSL_CERT_PATH", "", false)
	_ = l.Required("DATABASE_URL", "the operator stores cluster state in PostgreSQL")
	err := l.Err()
	if err == nil {
		t.Fatal("no error for bad configuration")
	}
	for _, name := range []string{"PORT", "LB_ALGORITHM", "RATE_LIMIT", "DRAIN", "ENABLED", "OPERATOR_URL", "SSL_CERT_PATH", "DATABASE_URL"} {
		if !strings.Contains(err.Error(), name+":") {
			t.Errorf("error does not name %s: %v", name, err)
		}
	}
	if len(urls) != 1 || urls[0].Host != "a:8080" {
		t.Errorf("URLs kept %v, want only http://a:8080", urls)
	}
}

func TestLoaderDefaultsAndValues(t *testing.T) {
	f := filepath.Join(t.TempDir(), "cert.pem")
	if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	l := FromMap(map[string]string{"PORT": "9000", "DRAIN": "45", "LIST": " a, ,b ", "CERT": f, "MODE": "IP-HASH"})
	if got := l.Addr("PORT", ":8080"); got != ":9000" {
		t.Errorf("Addr = %q", got)
	}
	if got := l.Addr("ADMIN", "127.0.0.1:8084"); got != "127.0.0.1:8084" {
		t.Errorf("Addr default = %q", got)
	}
	if got := l.Duration("DRAIN", time.Second); got != 45*time.Second {
		t.Errorf("Duration = %v", got)
	}
	if got := l.List("LIST", nil); strings.Join(got, "|") != "a|b" {
		t.Errorf("List = %q", got)
	}
	if got := l.Enum("MODE", "round-robin", "round-robin", "ip-hash"); got != "ip-hash" {
		t.Errorf("Enum = %q", got)
	}
	if got := l.File("CERT", "", true); got != f {
		t.Errorf("File = %q", got)
	}
	if got := l.Int("N", 3, 1, 10); got != 3 {
		t.Errorf("Int default = %d", got)
	}
	if err := l.Err(); err != nil {
		t.Fatal(err)
	}
}
