package console_test

import (
	"bufio"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/operator/agents/agenttest"
)

// startBuild deploys a commit of a project that builds from source and
// waits until its build runs on the node with the build slot; it returns
// the deployment's and the build's ids.
func startBuild(t testing.TB, e *env, u *user, project string) (deploymentID, buildID string) {
	t.Helper()
	if resp, page := u.post("/projects", url.Values{"name": {project}, "github_repo": {"acme/" + project}, "min_instances": {"1"}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("create project: %d %s", resp.StatusCode, page)
	}
	if resp, page := u.post("/projects/"+project+"/deployments", url.Values{"commit_sha": {strings.Repeat("5e", 20)}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("deploy a commit: %d %s", resp.StatusCode, page)
	}
	return waitBuild(t, e, project)
}

// waitBuild waits until the build of the project's deployment runs on the
// node with the build slot.
func waitBuild(t testing.TB, e *env, project string) (deploymentID, buildID string) {
	t.Helper()
	e.eventually("the build runs on its node", func() bool {
		_ = e.pool.QueryRow(t.Context(), `SELECT d.id, b.id FROM deployments d JOIN builds b ON b.deployment_id = d.id
			JOIN projects p ON p.id = d.project_id WHERE p.name = $1`, project).Scan(&deploymentID, &buildID)
		return buildID != "" && e.agents[0].BuildState(buildID) == "running"
	})
	return deploymentID, buildID
}

type streamed struct {
	Time   time.Time `json:"time"`
	Stream string    `json:"stream"`
	Line   string    `json:"line"`
}

// TestLogs follows a build's log through the console while the build
// runs (it ends when the build does), reads it as plain text, reads an
// app log, and finds another organisation's logs not found.
func TestLogs(t *testing.T) {
	t.Parallel()
	e := newBuildEnv(t)
	u := e.user()
	u.signIn(acmeToken)
	depID, buildID := startBuild(t, e, u, "api")
	base := "/projects/api/deployments/" + depID + "/logs/"

	resp, page := u.get(base + "build")
	if resp.StatusCode != 200 || !strings.Contains(page, `data-log="`+base+`build/stream"`) || !strings.Contains(page, `href="`+base+`build/text"`) {
		t.Fatalf("log page: %d %s", resp.StatusCode, page)
	}

	// Follow: lines arrive while the build runs; the stream ends with it.
	req, _ := http.NewRequestWithContext(t.Context(), "GET", u.base+base+"build/stream", nil)
	sresp, err := u.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer sresp.Body.Close()
	if sresp.StatusCode != 200 || sresp.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("stream: %d %s", sresp.StatusCode, sresp.Header.Get("Content-Type"))
	}
	lines := make(chan streamed, 100)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(sresp.Body)
		for sc.Scan() {
			var l streamed
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				lines <- l
			}
		}
	}()
	next := func(what string) streamed {
		t.Helper()
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("stream ended before %s", what)
			}
			return l
		case <-time.After(time.Minute):
			t.Fatalf("no line: %s", what)
		}
		return streamed{}
	}
	if l := next("the first line"); l.Stream != "zeitwork" || !strings.Contains(l.Line, "started") || l.Time.IsZero() {
		t.Fatalf("first line: %+v", l)
	}
	evil := `<script>alert("log")</script>`
	if err := e.agents[0].Log(buildID, "STEP 1/2: FROM scratch", evil); err != nil {
		t.Fatal(err)
	}
	if l := next("a line logged while following"); l.Line != "STEP 1/2: FROM scratch" || l.Stream != "build" {
		t.Fatalf("followed line: %+v", l)
	}
	if l := next("markup"); l.Line != evil {
		t.Fatalf("markup line: %+v", l)
	}
	if err := e.agents[0].FinishBuild(buildID, agenttest.BuildResult{Error: "boom", Lines: []string{"last words"}}); err != nil {
		t.Fatal(err)
	}
	var rest []string
	for done := false; !done; {
		select {
		case l, ok := <-lines:
			if !ok {
				done = true
				break
			}
			rest = append(rest, l.Line)
		case <-time.After(time.Minute):
			t.Fatal("the followed log did not end with its build")
		}
	}
	if !strings.Contains(strings.Join(rest, "\n"), "last words") {
		t.Fatalf("after the end: %q", rest)
	}

	// Plain text: the log so far, markup as text (text/plain, nosniff).
	resp, text := u.get(base + "build/text")
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") || resp.Header.Get("X-Content-Type-Options") != "nosniff" ||
		!strings.Contains(text, " build "+evil+"\n") || !strings.Contains(text, "last words") {
		t.Fatalf("plain text: %d %s %q", resp.StatusCode, resp.Header.Get("Content-Type"), text)
	}

	// An app log, merged from the node agents.
	_, _, webID, _ := acmeFixture(t, e)
	e.eventually("the app log", func() bool {
		_, text := u.get("/projects/web/deployments/" + webID + "/logs/app/text")
		return strings.Contains(text, "stdout hello from ")
	})
	if resp, _ := u.get("/projects/web/deployments/" + webID + "/logs/build"); resp.StatusCode != 404 {
		t.Fatalf("build log of an image deployment: %d", resp.StatusCode)
	}
	if resp, _ := u.get("/projects/web/deployments/" + depID + "/logs/build/text"); resp.StatusCode != 404 {
		t.Fatalf("a deployment under another project's path: %d", resp.StatusCode)
	}

	// Another organisation: not found, under any path.
	o := e.user()
	o.signIn(otherToken)
	if resp, _ := o.post("/projects", url.Values{"name": {"api"}, "min_instances": {"1"}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("other's project: %d", resp.StatusCode)
	}
	for _, p := range []string{base + "build", base + "build/stream", base + "build/text", base + "app/stream", base + "app/text",
		"/projects/web/deployments/" + webID + "/logs/app/text"} {
		if resp, body := o.get(p); resp.StatusCode != 404 || strings.Contains(body, "last words") || strings.Contains(body, "hello from") {
			t.Fatalf("another organisation's %s: %d", p, resp.StatusCode)
		}
	}
}
