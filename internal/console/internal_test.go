package console

import (
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

func TestLocalPath(t *testing.T) {
	for in, want := range map[string]string{
		"":                      "/projects",
		"/org":                  "/org",
		"/projects/web?x=1#env": "/projects/web?x=1#env",
		"//evil.example/":       "/projects",
		"/\\evil.example":       "/projects",
		"https://evil.example/": "/projects",
		"javascript:alert(1)":   "/projects",
		"/ok\r\nSet-Cookie: x":  "/projects",
		"projects":              "/projects",
	} {
		if got := localPath(in); got != want {
			t.Errorf("localPath(%q) = %q, want %q", in, got, want)
		}
	}
}

// FuzzLocalPath: whatever the sign-in form's next says, the redirect
// stays on this host.
func FuzzLocalPath(f *testing.F) {
	for _, s := range []string{"/org", "//x", "/\\x", "https://x", "/a/../b", "/%2F%2Fx"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, next string) {
		got := localPath(next)
		u, err := url.Parse(got)
		if err != nil || u.Host != "" || u.Scheme != "" || !strings.HasPrefix(got, "/") || strings.HasPrefix(got, "//") ||
			strings.ContainsAny(got, "\\\r\n") {
			t.Fatalf("localPath(%q) = %q leaves the console", next, got)
		}
	})
}

func TestAge(t *testing.T) {
	now := time.Date(2026, 1, 2, 12, 0, 0, 0, time.UTC)
	for d, want := range map[time.Duration]string{
		time.Second: "just now", 42 * time.Second: "42 s ago", 3 * time.Minute: "3 min ago",
		5 * time.Hour: "5 h ago", 72 * time.Hour: "3 d ago",
	} {
		if got := ageAt(now.Add(-d), now); got != want {
			t.Errorf("age of %s = %q, want %q", d, got, want)
		}
	}
}

// TestPhases: a deployment rolled back to after it was superseded is
// active again; its old end is not shown, and phases are in time order.
func TestPhases(t *testing.T) {
	at := func(s int) *time.Time { v := time.Unix(int64(s), 0); return &v }
	d := apiclient.Deployment{Status: "active", CreatedAt: *at(0), PreparingAt: at(1), StartingAt: at(2), HealthyAt: at(3),
		ActiveAt: at(9), FinishedAt: at(5)}
	var names []string
	for _, p := range phases(d) {
		names = append(names, p.Name)
	}
	if got := strings.Join(names, " "); got != "created preparing starting healthy active" {
		t.Fatalf("phases of a re-activated deployment: %s", got)
	}
	d.Status, d.ActiveAt, d.FinishedAt = "failed", nil, at(4)
	names = nil
	for _, p := range phases(d) {
		names = append(names, p.Name)
	}
	if got := strings.Join(names, " "); got != "created preparing starting healthy failed" {
		t.Fatalf("phases of a failed deployment: %s", got)
	}
}

// TestTemplatesEscape renders every page with markup in every string.
func TestTemplatesEscape(t *testing.T) {
	const evil = `"><script>alert(1)</script>`
	for name, tpl := range pages {
		if name == "project" {
			continue // needs its view; covered by the tests against the operator
		}
		var b strings.Builder
		v := &view{Title: evil, Error: evil, Flash: evil, CSRF: evil, c: &Console{assets: loadAssets()},
			Data: map[string]any{"Question": evil, "Button": evil, "Action": "/x", "Back": "/y", "Fields": map[string]string{evil: evil},
				"Next": evil, "Projects": []projectRow{}, "Form": map[string]string{"name": evil}, "Tokens": []tokenRow{{Token: Token{Name: evil}}}}}
		switch name {
		case "error":
			v.Data = &Error{Status: 404, Message: evil}
		case "logs":
			v.Data = &logsView{Project: evil, Name: evil, Kind: "build", Stream: "/s", Text: "/t", Other: "/o",
				Deployment: &apiclient.DeploymentDetail{Deployment: apiclient.Deployment{Status: evil, Build: &apiclient.DeploymentBuild{State: evil}}}}
		}
		if err := tpl.ExecuteTemplate(&b, "layout", v); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if strings.Contains(b.String(), "<script>alert(1)") {
			t.Errorf("%s renders markup", name)
		}
	}
}
