// Package browsertest starts Debian's chromium headless for tests that
// drive the console in a real browser (the console's own browser test and
// the end-to-end suite's).
package browsertest

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
)

// Start starts chromium (headless, a fresh profile, nothing in the
// background that would try the internet) and returns its browser
// context; the test's cleanup closes it. A machine without chromium fails
// the test (`make deps` installs it).
func Start(t testing.TB) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		// The machine has no internet: nothing in the background may try.
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("no-pings", true),
		chromedp.Flag("disable-domain-reliability", true),
		chromedp.WindowSize(1280, 900),
	)
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelAlloc)
	browser, cancelBrowser := chromedp.NewContext(alloc)
	t.Cleanup(cancelBrowser)
	if err := chromedp.Do(browser); err != nil {
		t.Fatalf("cannot start chromium: %v", err)
	}
	return browser
}

// chromium finds Debian's chromium (`make deps` installs it).
func chromium(t testing.TB) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("chromium is not installed (make deps installs it)")
	return ""
}

// Tab is a browser tab a test drives; each helper fails the test with
// what it was doing.
type Tab struct {
	T   testing.TB
	Ctx context.Context
	// Shots is where Shot writes PNGs (docs/console, relative to the
	// test's package directory).
	Shots string
}

// Do runs steps.
func (b *Tab) Do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.T.Helper()
	if err := chromedp.Do(b.Ctx, steps...); err != nil {
		b.T.Fatalf("%s: %v", what, err)
	}
}

// Submit clicks a form's button (or a link) and waits, up to 45 s, for
// the page it leads to.
func (b *Tab) Submit(what, button string) {
	b.T.Helper()
	ctx, cancel := context.WithTimeout(b.Ctx, 45*time.Second)
	defer cancel()
	if _, err := chromedp.Run(ctx, chromedp.WaitEvent(page.LoadEventFired, nil, chromedp.Click(chromedp.CSS(button)))); err != nil {
		b.T.Fatalf("%s: %v", what, err)
	}
}

// WaitJS waits until a JavaScript condition holds, for up to within; on
// failure it reports the page's address and text.
func (b *Tab) WaitJS(what, cond string, within time.Duration) {
	b.T.Helper()
	_, err := chromedp.Run(b.Ctx, chromedp.Poll[bool](cond, chromedp.WithPollingInterval(100*time.Millisecond),
		chromedp.WithPollingTimeout(within)))
	if err != nil {
		url, _ := chromedp.Run(b.Ctx, chromedp.Evaluate[string](`location.href`))
		body, _ := chromedp.Run(b.Ctx, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`))
		if len(body) > 3000 {
			body = body[:3000]
		}
		b.T.Fatalf("waiting for %s (at %s): %v\npage text:\n%s", what, url, err, body)
	}
}

// Text evaluates a JavaScript string expression.
func (b *Tab) Text(what, expr string) string {
	b.T.Helper()
	s, err := chromedp.Run(b.Ctx, chromedp.Evaluate[string](expr))
	if err != nil {
		b.T.Fatalf("%s: %v", what, err)
	}
	return s
}

// Shot writes a PNG of the viewport, or of the whole page, to Shots.
func (b *Tab) Shot(name string, full bool) {
	b.T.Helper()
	act := chromedp.CaptureScreenshot()
	if full {
		act = chromedp.FullScreenshot(100)
	}
	png, err := chromedp.Run(b.Ctx, act)
	if err != nil {
		b.T.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.MkdirAll(b.Shots, 0o755); err != nil {
		b.T.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(b.Shots, name+".png"), png, 0o644); err != nil {
		b.T.Fatal(err)
	}
}
