package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/zeitwork/zeitwork/internal/console/browsertest"
	"github.com/zeitwork/zeitwork/internal/devcluster"
)

// TestConsoleOnPlatform drives the web console in headless chromium
// against the real operator of a one-region cluster: sign in, create a
// project, deploy the sample image through the page and watch it go live
// without a reload (a real microVM boots), reach it through the load
// balancer, read the app's own log line on the deployment's log page,
// filter it, sign out. Every wait is on a DOM condition.
func TestConsoleOnPlatform(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a microVM and starts chromium")
	}
	s := startCluster(t, devcluster.Config{})
	v1 := s.push("v1", map[string]string{"APP_VERSION": "v1"})
	started := time.Now()

	ctx, cancel := context.WithTimeout(browsertest.Start(t), 6*time.Minute)
	defer cancel()
	b := &browsertest.Tab{T: t, Ctx: ctx, Shots: filepath.Join("..", "docs", "console")}

	// Script errors and CSP violations on the real operator's pages fail
	// the test.
	var mu sync.Mutex
	var problems []string
	messages := chromedp.Console(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() {
		for m, err := range messages {
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

	base := s.c.OperatorURL
	b.Do("open the console", chromedp.Navigate(base+"/projects"))
	b.WaitJS("the sign-in form", `location.pathname === "/signin" && document.getElementById("token") !== null`, 45*time.Second)
	b.Do("enter the token", chromedp.SetValue(chromedp.ID("token"), s.token))
	b.Submit("sign in", `form[action="/signin"] button[type="submit"]`)
	b.WaitJS("the projects page", `location.pathname === "/projects" && document.querySelector("h1").textContent === "Projects"`, 45*time.Second)

	b.Do("fill in the project", chromedp.SetValue(chromedp.ID("p-name"), "hello"), chromedp.SetValue(chromedp.ID("p-port"), "8080"),
		chromedp.SetValue(chromedp.ID("p-health"), "/healthz"), chromedp.SetValue(chromedp.ID("p-min"), "1"))
	b.Submit("create the project", `form[action="/projects"] button[type="submit"]`)
	b.WaitJS("the project page", `location.pathname === "/projects/hello"`, 45*time.Second)
	prodURL := b.Text("the production URL", `document.querySelector("p.sub a").href.replace(/\/$/, "")`)

	// Deploy through the page; the deployment list follows the phases of
	// the real rollout (image to root file system, microVM boot, health
	// checks) by itself: the marker shows the page never reloaded.
	b.Do("enter the image", chromedp.SetValue(chromedp.ID("image"), v1))
	b.Submit("deploy", `form[action="/projects/hello/deployments"] button[type="submit"]`)
	b.WaitJS("the deployment listed", `document.querySelector("#deployments-list li.dep") !== null`, 45*time.Second)
	b.Do("mark the page", chromedp.Evaluate[chromedp.Void](`window.zwSamePage = true`))
	deployed := time.Now()
	b.WaitJS("the deployment active without a reload", `window.zwSamePage === true &&
		document.querySelector('#deployments-list li.dep[data-status="active"]') !== null`, 3*time.Minute)
	t.Logf("the page showed the deployment active %s after the deploy", time.Since(deployed).Round(time.Millisecond))
	if st := b.Text("failed deployments", `String(document.querySelectorAll('#deployments-list li.dep[data-status="failed"]').length)`); st != "0" {
		t.Fatalf("%s failed deployments on the page", st)
	}
	id := b.Text("the deployment's id", `document.querySelector('#deployments-list li.dep[data-status="active"]').dataset.id`)

	// The production URL the page shows serves the app through the load
	// balancer, the edge and the microVM.
	if !strings.HasPrefix(prodURL, "https://hello-") {
		t.Fatalf("the page's production URL is %q", prodURL)
	}
	s.waitBody(s.client(0, ""), prodURL+"/", "hello from v1", time.Minute)

	// The app log: the line the app wrote at start inside the VM shows up
	// on the page; a filter hides what lacks it.
	b.Submit("open the app log", "#applog-"+id)
	b.WaitJS("the log page", `document.getElementById("log") !== null && document.getElementById("log-filter") !== null`, 45*time.Second)
	const started1 = "hello v1 listening on :8080"
	b.WaitJS("the app's start line", fmt.Sprintf(`Array.from(document.querySelectorAll("#log .logline .ll")).some(function (e) { return e.textContent.includes(%q); })`, started1), 2*time.Minute)
	b.Do("type a filter", chromedp.SendKeys(chromedp.ID("log-filter"), "listening"))
	b.WaitJS("only lines with it shown", `(function () {
		var shown = Array.from(document.querySelectorAll("#log .logline:not([hidden])"));
		return shown.length >= 1 && shown.every(function (r) { return r.textContent.includes("listening"); }) &&
			document.querySelectorAll("#log .logline[hidden]").length === document.querySelectorAll("#log .logline").length - shown.length; })()`, 45*time.Second)
	b.Shot("platform-logs", false)
	b.Do("narrow the filter", chromedp.SendKeys(chromedp.ID("log-filter"), " nowhere"))
	b.WaitJS("every line hidden", `document.querySelectorAll("#log .logline:not([hidden])").length === 0 &&
		document.querySelectorAll("#log .logline[hidden]").length >= 1`, 45*time.Second)

	// Sign out: the console is closed until the next sign-in.
	b.Do("back to the projects", chromedp.Navigate(base+"/projects"))
	b.WaitJS("the projects list", `document.querySelector('form[action="/signout"]') !== null`, 45*time.Second)
	b.Submit("sign out", `form[action="/signout"] button[type="submit"]`)
	b.WaitJS("signed out", `location.pathname === "/signin"`, 45*time.Second)
	b.Do("open the project again", chromedp.Navigate(base+"/projects/hello"))
	b.WaitJS("the sign-in form again", `location.pathname === "/signin"`, 45*time.Second)

	cancel()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if len(problems) > 0 {
		t.Errorf("script errors or CSP violations: %q", problems)
	}
	t.Logf("the browser part took %s", time.Since(started).Round(time.Millisecond))
}
