package console_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"

	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/console/browsertest"
	"github.com/zeitwork/zeitwork/internal/operator/agents/agenttest"
)

// screenshots is where the browser test leaves pictures of the main pages
// (linked from the README).
const screenshots = "../../docs/console"

// wait bounds each wait on the page.
const wait = 45 * time.Second

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
	b := &browsertest.Tab{T: t, Ctx: ctx, Shots: screenshots}

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
	b.Do("open the console", chromedp.Navigate(e.url+"/projects"))
	b.WaitJS("the sign-in form", `location.pathname === "/signin" && document.getElementById("token") !== null`, wait)
	b.Shot("signin", false)
	b.Do("enter the token", chromedp.SetValue(chromedp.ID("token"), acmeToken))
	b.Submit("sign in", `form[action="/signin"] button[type="submit"]`)
	b.WaitJS("the projects page", `location.pathname === "/projects" && document.querySelector("h1").textContent === "Projects"`, wait)

	// Create a project.
	b.Do("fill in the project", chromedp.SetValue(chromedp.ID("p-name"), "web"), chromedp.SetValue(chromedp.ID("p-min"), "1"))
	b.Submit("create the project", `form[action="/projects"] button[type="submit"]`)
	b.WaitJS("the project page", `location.pathname === "/projects/web"`, wait)

	// Deploy through the page; the list follows the phases by itself.
	b.Do("enter the image", chromedp.SetValue(chromedp.ID("image"), e.images["v1"]))
	b.Submit("deploy", `form[action="/projects/web/deployments"] button[type="submit"]`)
	b.WaitJS("the first deployment live", `document.querySelector('#deployments-list li.dep[data-status="active"]') !== null`, wait)
	first := b.Text("the first deployment's id", `document.querySelector('#deployments-list li.dep[data-status="active"]').dataset.id`)

	// A deployment through the API appears and goes live on the open page:
	// no reload (the marker survives).
	b.Do("mark the page", chromedp.Evaluate[chromedp.Void](`window.zwSamePage = true`))
	second := apiDeploy(t, e, acmeToken, "web", e.images["v2"])
	b.WaitJS("the second deployment live without a reload", fmt.Sprintf(
		`(function () { var d = document.querySelector('li.dep[data-id="%s"]'); return d !== null && d.dataset.status === "active"; })()`, second), wait)
	b.WaitJS("the first one superseded", fmt.Sprintf(`document.querySelector('li.dep[data-id="%s"]').dataset.status === "superseded"`, first), wait)
	if b.Text("the marker", `String(window.zwSamePage === true)`) != "true" {
		t.Fatal("the page reloaded to show the new deployment")
	}
	if live := b.Text("the live note", `document.getElementById("live-note").textContent`); !strings.Contains(live, "active") {
		t.Errorf("screen readers were told %q", live)
	}

	// Roll back with the deployment's button (the page asks first).
	b.Submit("roll back", "#rollback-"+first)
	b.WaitJS("the first deployment live again", fmt.Sprintf(`document.querySelector('li.dep[data-id="%s"]').dataset.status === "active"`, first), wait)
	if f := b.Text("the notice", `document.querySelector(".flash").textContent`); !strings.Contains(f, "serves production now") {
		t.Errorf("after the rollback the page says %q", f)
	}

	// An environment variable: the value is never on a page again.
	const value = "postgres://app:s3cret-browser-value@db/app"
	b.Do("fill in the variable", chromedp.SetValue(chromedp.ID("env-name"), "DATABASE_URL"), chromedp.SetValue(chromedp.ID("env-value"), value))
	b.Submit("set the variable", `form[action="/projects/web/env"] button[type="submit"]`)
	b.WaitJS("the variable listed", `document.querySelector(".flash") !== null && document.querySelector(".flash").textContent.includes("applies to the next deploy")`, wait)
	if html := b.Text("the page", `document.documentElement.outerHTML`); strings.Contains(html, "s3cret-browser-value") || !strings.Contains(html, ">DATABASE_URL<") {
		t.Fatal("the variable's value is on the page, or its name is not")
	}

	// A domain: the page shows the DNS record to create.
	b.Do("fill in the domain", chromedp.SetValue(chromedp.ID("domain-name"), "www.example.test"))
	b.Submit("add the domain", `form[action="/projects/web/domains"] button[type="submit"]`)
	b.WaitJS("the DNS records", `(function () { var d = document.getElementById("domain-www.example.test");
		return d !== null && d.textContent.includes("CNAME") && d.textContent.includes("edge.zeitwork.test"); })()`, wait)
	// Each record's value has a copy button (the clipboard, or a selected
	// field to copy from where the page may not use it).
	b.Do("copy the CNAME value", chromedp.Click(chromedp.CSS(`[id="domain-www.example.test"] button.copy`)))
	b.WaitJS("the value copied", `(function () { var c = document.querySelector('[id="domain-www.example.test"] button.copy');
		var f = c.parentNode.querySelector("input.copy-text");
		return c.dataset.copied === "clipboard" || (f !== null && f.value === "edge.zeitwork.test"); })()`, wait)
	b.Do("scroll up", chromedp.Evaluate[chromedp.Void](`window.scrollTo(0, 0)`))
	b.Shot("project", true)

	// A build's log, live: lines appear while the build runs, without a
	// reload; markup in a line is text; the filter hides what lacks it.
	b.Do("open the projects for a second project", chromedp.Navigate(e.url+"/projects"))
	b.Do("fill in a project built from source", chromedp.SetValue(chromedp.ID("p-name"), "api"), chromedp.SetValue(chromedp.ID("p-repo"), "acme/api"),
		chromedp.SetValue(chromedp.ID("p-min"), "1"))
	b.Submit("create the project", `form[action="/projects"] button[type="submit"]`)
	b.WaitJS("the project page", `location.pathname === "/projects/api"`, wait)
	b.Do("enter a commit", chromedp.SetValue(chromedp.ID("commit"), strings.Repeat("5e", 20)))
	b.Submit("deploy the commit", `form[action="/projects/api/deployments"] button[type="submit"]`)
	depID, buildID := waitBuild(t, e, "api")
	b.WaitJS("the build log link", `document.getElementById("buildlog-`+depID+`") !== null`, wait)
	b.Submit("open the build log", "#buildlog-"+depID)
	b.WaitJS("the first line", `document.querySelectorAll("#log .logline").length >= 1`, wait)
	b.Do("mark the log page", chromedp.Evaluate[chromedp.Void](`window.zwLogPage = true`))
	evil := `<script>alert("log")</script>`
	if err := e.agents[0].Log(buildID, "STEP 1/3: FROM docker.io/library/golang:1.26", "go: downloading github.com/acme/api v1.4.2", evil,
		"STEP 2/3: RUN go build -o /app ./cmd/api", "STEP 3/3: COPY --from=0 /app /app"); err != nil {
		t.Fatal(err)
	}
	b.WaitJS("the new lines without a reload", `window.zwLogPage === true && document.querySelectorAll("#log .logline").length >= 6`, wait)
	if got := b.Text("the markup line", `Array.from(document.querySelectorAll("#log .ll")).map(function (e) { return e.textContent; }).join("\n")`); !strings.Contains(got, evil) {
		t.Errorf("the markup line shows as %q", got)
	}
	if n := b.Text("scripts on the log page", `String(document.scripts.length + document.querySelectorAll("#log script").length)`); n != "1" {
		t.Errorf("%s scripts on the log page, want only the console's", n)
	}
	b.Do("type a filter", chromedp.SendKeys(chromedp.ID("log-filter"), "step"))
	b.WaitJS("lines without it hidden", `document.querySelectorAll("#log .logline:not([hidden])").length === 3 && document.querySelectorAll("#log .logline[hidden]").length === 3`, wait)
	b.Shot("logs", false)
	if err := e.agents[0].FinishBuild(buildID, agenttest.BuildResult{Error: "boom"}); err != nil {
		t.Fatal(err)
	}
	b.WaitJS("the log's end", `document.getElementById("log").dataset.ended === "1"`, wait)

	// The same page at phone width.
	b.Do("phone width", chromedp.EmulateViewport(390, 844, chromedp.EmulateScale(2)), chromedp.Navigate(e.url+"/projects/web"))
	b.WaitJS("the project page on a phone", `document.querySelector("h1").textContent === "web" && document.documentElement.scrollWidth <= 390`, wait)
	b.Shot("project-phone", false)
	b.Do("desktop width", chromedp.EmulateViewport(1280, 900, chromedp.EmulateScale(1)))

	// A token, shown once.
	b.Do("open the organisation", chromedp.Navigate(e.url+"/org"))
	b.Do("name the token", chromedp.SetValue(chromedp.ID("token-name"), "ci"))
	b.Submit("create a token", `form[action="/org/tokens"] button[type="submit"]`)
	b.WaitJS("the new token", `document.getElementById("new-token") !== null && document.getElementById("new-token").value.startsWith("zw_")`, wait)
	b.Shot("org", true)

	b.Do("open the projects", chromedp.Navigate(e.url+"/projects"))
	b.WaitJS("the projects list", `document.querySelector("table.list .badge") !== null`, wait)
	b.Shot("projects", false)

	// Markup as a project name is shown as text and never runs.
	b.Do("name a project with markup", chromedp.SetValue(chromedp.ID("p-name"), "<script>alert(1)</script>"))
	b.Submit("create it", `form[action="/projects"] button[type="submit"]`)
	b.WaitJS("the refusal", `document.querySelector(".error") !== null && document.querySelector(".error").textContent.includes("<script>alert(1)</script>")`, wait)
	if n := b.Text("scripts on the page", `String(document.scripts.length)`); n != "1" {
		t.Errorf("%s scripts on the page, want only the console's", n)
	}

	// Another organisation's project is not found.
	b.Do("open another organisation's project", chromedp.Navigate(e.url+"/projects/"+foreign))
	b.WaitJS("not found", `document.querySelector("h1").textContent === "Not found"`, wait)
	if strings.Contains(b.Text("the page", `document.body.textContent`), "secret-plans") {
		t.Fatal("the other organisation's project name is shown")
	}

	// Sign out: the console is closed until the next sign-in.
	b.Do("back to the projects", chromedp.Navigate(e.url+"/projects"))
	b.Submit("sign out", `form[action="/signout"] button[type="submit"]`)
	b.WaitJS("signed out", `location.pathname === "/signin" && document.querySelector(".flash").textContent.includes("signed out")`, wait)
	b.Do("open a project again", chromedp.Navigate(e.url+"/projects/web"))
	b.WaitJS("the sign-in form again", `location.pathname === "/signin"`, wait)

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

// apiCreateProject creates a project through the HTTP API and returns its id.
func apiCreateProject(t *testing.T, e *env, token, name string) string {
	t.Helper()
	var p struct {
		ID string `json:"id"`
	}
	err := apiclient.New(e.url, token).Do(t.Context(), "POST", "/api/v1/projects",
		map[string]any{"name": name, "min_instances_per_region": 1}, &p)
	if err != nil {
		t.Fatalf("create project through the API: %v", err)
	}
	return p.ID
}
