package console_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"

	"github.com/zeitwork/zeitwork/internal/console/browsertest"
	"github.com/zeitwork/zeitwork/internal/operator/agents/agenttest"
)

// screenshots is where the browser test leaves pictures of the main pages
// (linked from the README).
const screenshots = "../../docs/console"

// TestBrowser drives the console in Debian's chromium (headless) the way a
// developer would: sign in, create a project, deploy, watch the deployment
// go live without a reload, roll back, set a variable, add a domain, create
// a token, sign out; and tries another organisation's project and a
// project name that is markup. Every wait is on a DOM condition, with room
// for a loaded machine.
func TestBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("starts chromium")
	}
	e := newBuildEnv(t)
	foreign := apiCreateProject(t, e, otherToken, "secret-plans")
	started := time.Now()

	browser := browsertest.Start(t)
	ctx, cancel := context.WithTimeout(browser, 3*time.Minute)
	defer cancel()
	b := &tab{t: t, ctx: ctx, base: e.url}

	// Confirmations are accepted; any other dialog (an alert from injected
	// markup) is a failure. CSP violations and script errors are failures.
	var mu sync.Mutex
	var alerts, problems []string
	dialogs := chromedp.Events(ctx, page.JavascriptDialogOpening)
	console := chromedp.Console(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() {
		for ev, err := range dialogs {
			if err != nil {
				return
			}
			if ev.Type != page.DialogTypeConfirm {
				mu.Lock()
				alerts = append(alerts, string(ev.Type)+": "+ev.Message)
				mu.Unlock()
			}
			go func() {
				_, _ = chromedp.Call(ctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: true})
			}()
		}
	})
	wg.Go(func() {
		for m, err := range console {
			if err != nil {
				return
			}
			if m.IsException() || strings.Contains(m.Text, "Content Security Policy") {
				mu.Lock()
				problems = append(problems, m.String())
				mu.Unlock()
			}
		}
	})

	// Sign in (a page asked for while signed out leads to the form).
	b.do("open the console", chromedp.Navigate(e.url+"/projects"))
	b.waitJS("the sign-in form", `location.pathname === "/signin" && document.getElementById("token") !== null`)
	b.shot("signin", false)
	b.do("enter the token", chromedp.SetValue(chromedp.ID("token"), acmeToken))
	b.submit("sign in", `form[action="/signin"] button[type="submit"]`)
	b.waitJS("the projects page", `location.pathname === "/projects" && document.querySelector("h1").textContent === "Projects"`)

	// Create a project.
	b.do("fill in the project", chromedp.SetValue(chromedp.ID("p-name"), "web"), chromedp.SetValue(chromedp.ID("p-min"), "1"))
	b.submit("create the project", `form[action="/projects"] button[type="submit"]`)
	b.waitJS("the project page", `location.pathname === "/projects/web"`)

	// Deploy through the page; the list follows the phases by itself.
	b.do("enter the image", chromedp.SetValue(chromedp.ID("image"), e.images["v1"]))
	b.submit("deploy", `form[action="/projects/web/deployments"] button[type="submit"]`)
	b.waitJS("the first deployment live", `document.querySelector('#deployments-list li.dep[data-status="active"]') !== null`)
	first := b.text("the first deployment's id", `document.querySelector('#deployments-list li.dep[data-status="active"]').dataset.id`)

	// A deployment through the API appears and goes live on the open page:
	// no reload (the marker survives).
	b.do("mark the page", chromedp.Evaluate[chromedp.Void](`window.zwSamePage = true`))
	second := apiDeploy(t, e, acmeToken, "web", e.images["v2"])
	b.waitJS("the second deployment live without a reload", fmt.Sprintf(
		`(function () { var d = document.querySelector('li.dep[data-id="%s"]'); return d !== null && d.dataset.status === "active"; })()`, second))
	b.waitJS("the first one superseded", fmt.Sprintf(`document.querySelector('li.dep[data-id="%s"]').dataset.status === "superseded"`, first))
	if b.text("the marker", `String(window.zwSamePage === true)`) != "true" {
		t.Fatal("the page reloaded to show the new deployment")
	}
	if live := b.text("the live note", `document.getElementById("live-note").textContent`); !strings.Contains(live, "active") {
		t.Errorf("screen readers were told %q", live)
	}

	// Roll back with the deployment's button (the page asks first).
	b.submit("roll back", "#rollback-"+first)
	b.waitJS("the first deployment live again", fmt.Sprintf(`document.querySelector('li.dep[data-id="%s"]').dataset.status === "active"`, first))
	if f := b.text("the notice", `document.querySelector(".flash").textContent`); !strings.Contains(f, "serves production now") {
		t.Errorf("after the rollback the page says %q", f)
	}

	// An environment variable: the value is never on a page again.
	const value = "postgres://app:s3cret-browser-value@db/app"
	b.do("fill in the variable", chromedp.SetValue(chromedp.ID("env-name"), "DATABASE_URL"), chromedp.SetValue(chromedp.ID("env-value"), value))
	b.submit("set the variable", `form[action="/projects/web/env"] button[type="submit"]`)
	b.waitJS("the variable listed", `document.querySelector(".flash") !== null && document.querySelector(".flash").textContent.includes("applies to the next deploy")`)
	if html := b.text("the page", `document.documentElement.outerHTML`); strings.Contains(html, "s3cret-browser-value") || !strings.Contains(html, ">DATABASE_URL<") {
		t.Fatal("the variable's value is on the page, or its name is not")
	}

	// A domain: the page shows the DNS record to create.
	b.do("fill in the domain", chromedp.SetValue(chromedp.ID("domain-name"), "www.example.test"))
	b.submit("add the domain", `form[action="/projects/web/domains"] button[type="submit"]`)
	b.waitJS("the DNS records", `(function () { var d = document.getElementById("domain-www.example.test");
		return d !== null && d.textContent.includes("CNAME") && d.textContent.includes("edge.zeitwork.test"); })()`)
	// Each record's value has a copy button (the clipboard, or a selected
	// field to copy from where the page may not use it).
	b.do("copy the CNAME value", chromedp.Click(chromedp.CSS(`[id="domain-www.example.test"] button.copy`)))
	b.waitJS("the value copied", `(function () { var c = document.querySelector('[id="domain-www.example.test"] button.copy');
		var f = c.parentNode.querySelector("input.copy-text");
		return c.dataset.copied === "clipboard" || (f !== null && f.value === "edge.zeitwork.test"); })()`)
	b.do("scroll up", chromedp.Evaluate[chromedp.Void](`window.scrollTo(0, 0)`))
	b.shot("project", true)

	// A build's log, live: lines appear while the build runs, without a
	// reload; markup in a line is text; the filter hides what lacks it.
	b.do("open the projects for a second project", chromedp.Navigate(e.url+"/projects"))
	b.do("fill in a project built from source", chromedp.SetValue(chromedp.ID("p-name"), "api"), chromedp.SetValue(chromedp.ID("p-repo"), "acme/api"),
		chromedp.SetValue(chromedp.ID("p-min"), "1"))
	b.submit("create the project", `form[action="/projects"] button[type="submit"]`)
	b.waitJS("the project page", `location.pathname === "/projects/api"`)
	b.do("enter a commit", chromedp.SetValue(chromedp.ID("commit"), strings.Repeat("5e", 20)))
	b.submit("deploy the commit", `form[action="/projects/api/deployments"] button[type="submit"]`)
	depID, buildID := waitBuild(t, e, "api")
	b.waitJS("the build log link", `document.getElementById("buildlog-`+depID+`") !== null`)
	b.submit("open the build log", "#buildlog-"+depID)
	b.waitJS("the first line", `document.querySelectorAll("#log .logline").length >= 1`)
	b.do("mark the log page", chromedp.Evaluate[chromedp.Void](`window.zwLogPage = true`))
	evil := `<script>alert("log")</script>`
	if err := e.agents[0].Log(buildID, "STEP 1/3: FROM docker.io/library/golang:1.26", "go: downloading github.com/acme/api v1.4.2", evil,
		"STEP 2/3: RUN go build -o /app ./cmd/api", "STEP 3/3: COPY --from=0 /app /app"); err != nil {
		t.Fatal(err)
	}
	b.waitJS("the new lines without a reload", `window.zwLogPage === true && document.querySelectorAll("#log .logline").length >= 6`)
	if got := b.text("the markup line", `Array.from(document.querySelectorAll("#log .ll")).map(function (e) { return e.textContent; }).join("\n")`); !strings.Contains(got, evil) {
		t.Errorf("the markup line shows as %q", got)
	}
	if n := b.text("scripts on the log page", `String(document.scripts.length + document.querySelectorAll("#log script").length)`); n != "1" {
		t.Errorf("%s scripts on the log page, want only the console's", n)
	}
	b.do("type a filter", chromedp.SendKeys(chromedp.ID("log-filter"), "step"))
	b.waitJS("lines without it hidden", `document.querySelectorAll("#log .logline:not([hidden])").length === 3 && document.querySelectorAll("#log .logline[hidden]").length === 3`)
	b.shot("logs", false)
	if err := e.agents[0].FinishBuild(buildID, agenttest.BuildResult{Error: "boom"}); err != nil {
		t.Fatal(err)
	}
	b.waitJS("the log's end", `document.getElementById("log").dataset.ended === "1"`)

	// The same page at phone width.
	b.do("phone width", chromedp.EmulateViewport(390, 844, chromedp.EmulateScale(2)), chromedp.Navigate(e.url+"/projects/web"))
	b.waitJS("the project page on a phone", `document.querySelector("h1").textContent === "web" && document.documentElement.scrollWidth <= 390`)
	b.shot("project-phone", false)
	b.do("desktop width", chromedp.EmulateViewport(1280, 900, chromedp.EmulateScale(1)))

	// A token, shown once.
	b.do("open the organisation", chromedp.Navigate(e.url+"/org"))
	b.do("name the token", chromedp.SetValue(chromedp.ID("token-name"), "ci"))
	b.submit("create a token", `form[action="/org/tokens"] button[type="submit"]`)
	b.waitJS("the new token", `document.getElementById("new-token") !== null && document.getElementById("new-token").value.startsWith("zw_")`)
	b.shot("org", true)

	b.do("open the projects", chromedp.Navigate(e.url+"/projects"))
	b.waitJS("the projects list", `document.querySelector("table.list .badge") !== null`)
	b.shot("projects", false)

	// Markup as a project name is shown as text and never runs.
	b.do("name a project with markup", chromedp.SetValue(chromedp.ID("p-name"), "<script>alert(1)</script>"))
	b.submit("create it", `form[action="/projects"] button[type="submit"]`)
	b.waitJS("the refusal", `document.querySelector(".error") !== null && document.querySelector(".error").textContent.includes("<script>alert(1)</script>")`)
	if n := b.text("scripts on the page", `String(document.scripts.length)`); n != "1" {
		t.Errorf("%s scripts on the page, want only the console's", n)
	}

	// Another organisation's project is not found.
	b.do("open another organisation's project", chromedp.Navigate(e.url+"/projects/"+foreign))
	b.waitJS("not found", `document.querySelector("h1").textContent === "Not found"`)
	if strings.Contains(b.text("the page", `document.body.textContent`), "secret-plans") {
		t.Fatal("the other organisation's project name is shown")
	}

	// Sign out: the console is closed until the next sign-in.
	b.do("back to the projects", chromedp.Navigate(e.url+"/projects"))
	b.submit("sign out", `form[action="/signout"] button[type="submit"]`)
	b.waitJS("signed out", `location.pathname === "/signin" && document.querySelector(".flash").textContent.includes("signed out")`)
	b.do("open a project again", chromedp.Navigate(e.url+"/projects/web"))
	b.waitJS("the sign-in form again", `location.pathname === "/signin"`)

	cancel()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if len(alerts) > 0 {
		t.Errorf("dialogs other than confirmations: %q", alerts)
	}
	if len(problems) > 0 {
		t.Errorf("script errors or CSP violations: %q", problems)
	}
	t.Logf("the browser part took %s", time.Since(started).Round(time.Millisecond))
}

// tab is the browser tab a test drives.
type tab struct {
	t    *testing.T
	ctx  context.Context
	base string
}

func (b *tab) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	if err := chromedp.Do(b.ctx, steps...); err != nil {
		b.t.Fatalf("%s: %v", what, err)
	}
}

// submit clicks a form's button and waits (up to 45 s) for the page it
// leads to.
func (b *tab) submit(what, button string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 45*time.Second)
	defer cancel()
	if _, err := chromedp.Run(ctx, chromedp.WaitEvent(page.LoadEventFired, nil, chromedp.Click(chromedp.CSS(button)))); err != nil {
		b.t.Fatalf("%s: %v", what, err)
	}
}

// waitJS waits until a JavaScript condition holds, for up to 45 s.
func (b *tab) waitJS(what, cond string) {
	b.t.Helper()
	_, err := chromedp.Run(b.ctx, chromedp.Poll[bool](cond, chromedp.WithPollingInterval(100*time.Millisecond),
		chromedp.WithPollingTimeout(45*time.Second)))
	if err != nil {
		url, _ := chromedp.Run(b.ctx, chromedp.Evaluate[string](`location.href`))
		b.t.Fatalf("waiting for %s (at %s): %v", what, url, err)
	}
}

func (b *tab) text(what, expr string) string {
	b.t.Helper()
	s, err := chromedp.Run(b.ctx, chromedp.Evaluate[string](expr))
	if err != nil {
		b.t.Fatalf("%s: %v", what, err)
	}
	return s
}

// shot writes a PNG of the viewport, or of the whole page, to docs/console.
func (b *tab) shot(name string, full bool) {
	b.t.Helper()
	act := chromedp.CaptureScreenshot()
	if full {
		act = chromedp.FullScreenshot(100)
	}
	png, err := chromedp.Run(b.ctx, act)
	if err != nil {
		b.t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.MkdirAll(screenshots, 0o755); err != nil {
		b.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(screenshots, name+".png"), png, 0o644); err != nil {
		b.t.Fatal(err)
	}
}

// apiCreateProject creates a project through the HTTP API and returns its id.
func apiCreateProject(t *testing.T, e *env, token, name string) string {
	t.Helper()
	req, _ := http.NewRequest("POST", e.url+"/api/v1/projects", strings.NewReader(`{"name":"`+name+`","min_instances_per_region":1}`))
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var p struct {
		ID string `json:"id"`
	}
	if resp.StatusCode != http.StatusCreated || json.Unmarshal(b, &p) != nil {
		t.Fatalf("create project through the API: %d %s", resp.StatusCode, b)
	}
	return p.ID
}
