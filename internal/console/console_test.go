package console_test

import (
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

// sessionCookie returns the Set-Cookie of the console session in resp.
func sessionCookie(resp *http.Response) *http.Cookie {
	for _, c := range resp.Cookies() {
		if c.Name == "zw_session" {
			return c
		}
	}
	return nil
}

func wantHeaders(t *testing.T, what string, resp *http.Response) {
	t.Helper()
	csp := resp.Header.Get("Content-Security-Policy")
	for _, want := range []string{"script-src 'self'", "frame-ancestors 'none'", "default-src 'none'", "form-action 'self'"} {
		if !strings.Contains(csp, want) {
			t.Errorf("%s: Content-Security-Policy %q lacks %q", what, csp, want)
		}
	}
	if strings.Contains(csp, "unsafe-inline") || strings.Contains(csp, "unsafe-eval") {
		t.Errorf("%s: Content-Security-Policy %q allows inline code", what, csp)
	}
	if got := resp.Header.Get("X-Frame-Options"); got != "DENY" {
		t.Errorf("%s: X-Frame-Options %q", what, got)
	}
	if got := resp.Header.Get("X-Content-Type-Options"); got != "nosniff" {
		t.Errorf("%s: X-Content-Type-Options %q", what, got)
	}
}

func TestSignInAndOut(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u := e.user()

	resp, _ := u.get("/")
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/signin" {
		t.Fatalf("/ signed out: %d %s", resp.StatusCode, resp.Header.Get("Location"))
	}
	resp, _ = u.get("/projects/web?x=1")
	if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusSeeOther || loc != "/signin?next="+url.QueryEscape("/projects/web?x=1") {
		t.Fatalf("a page signed out: %d %s", resp.StatusCode, loc)
	}

	// The sign-in page is small and carries the security headers; so do
	// its assets.
	resp, page := u.get("/signin")
	wantHeaders(t, "/signin", resp)
	if resp.StatusCode != 200 || !strings.Contains(page, `<label for="token">API token</label>`) {
		t.Fatalf("sign-in page: %d %s", resp.StatusCode, page)
	}
	total := len(page)
	for _, m := range regexp.MustCompile(`(?:href|src)="(/static/[^"]+)"`).FindAllStringSubmatch(page, -1) {
		r, body := u.get(strings.ReplaceAll(m[1], "&amp;", "&"))
		if r.StatusCode != 200 || !strings.Contains(r.Header.Get("Cache-Control"), "immutable") {
			t.Errorf("%s: %d %s", m[1], r.StatusCode, r.Header.Get("Cache-Control"))
		}
		wantHeaders(t, m[1], r)
		total += len(body)
	}
	if total > 60_000 {
		t.Errorf("the first page weighs %d bytes with its assets", total)
	}

	// A form posted without the sign-in page's token (a login CSRF) fails.
	stranger := e.user()
	if resp, _ := stranger.post("/signin", url.Values{"token": {acmeToken}, "csrf": {"forged"}}); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("sign-in without the form's token: %d", resp.StatusCode)
	}
	u.get("/signin")
	resp, page = u.post("/signin", url.Values{"token": {"zw_not_a_token_at_all"}})
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(page, "not valid") || sessionCookie(resp) != nil {
		t.Fatalf("wrong token: %d %v", resp.StatusCode, sessionCookie(resp))
	}

	resp, _ = u.post("/signin", url.Values{"token": {acmeToken}, "next": {"/org"}})
	ck := sessionCookie(resp)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/org" || ck == nil {
		t.Fatalf("sign in: %d %s", resp.StatusCode, resp.Header.Get("Location"))
	}
	if !ck.HttpOnly || ck.SameSite != http.SameSiteStrictMode || ck.Secure || ck.Path != "/" {
		t.Fatalf("session cookie over HTTP: %+v", ck)
	}
	resp, page = u.follow(resp)
	if resp.StatusCode != 200 || !strings.Contains(page, "Organisation <span class=\"mono\">acme</span>") {
		t.Fatalf("org page after sign-in: %d", resp.StatusCode)
	}
	wantHeaders(t, "/org", resp)
	if cc := resp.Header.Get("Cache-Control"); cc != "no-store" {
		t.Fatalf("signed-in page Cache-Control %q", cc)
	}

	// An open redirect through next is refused.
	for _, next := range []string{"//evil.example/x", "https://evil.example/", "/\\evil.example"} {
		v := e.user()
		v.get("/signin")
		if resp, _ := v.post("/signin", url.Values{"token": {acmeToken}, "next": {next}}); resp.Header.Get("Location") != "/projects" {
			t.Errorf("next=%q redirected to %q", next, resp.Header.Get("Location"))
		}
	}

	// Sign-out needs the CSRF token, and then ends the session for good:
	// the old cookie no longer opens anything.
	if resp, _ := u.post("/signout", url.Values{"csrf": {"nope"}}); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("sign-out without CSRF token: %d", resp.StatusCode)
	}
	resp, _ = u.post("/signout", nil)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/signin" {
		t.Fatalf("sign out: %d", resp.StatusCode)
	}
	if c := sessionCookie(resp); c == nil || c.MaxAge >= 0 {
		t.Fatalf("sign-out did not clear the cookie: %+v", c)
	}
	if _, page := u.follow(resp); !strings.Contains(page, "You are signed out.") {
		t.Fatal("no sign-out notice")
	}
	replay := e.user()
	base, _ := url.Parse(e.url)
	replay.hc.Jar.SetCookies(base, []*http.Cookie{{Name: "zw_session", Value: ck.Value}})
	if resp, _ := replay.get("/projects"); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("old session cookie after sign-out: %d", resp.StatusCode)
	}
	var n int
	_ = e.pool.QueryRow(t.Context(), "SELECT count(*) FROM console_sessions").Scan(&n)
	if n != 3 { // the three open-redirect probes are still signed in
		t.Fatalf("%d sessions stored", n)
	}

	// Over TLS the cookie is Secure.
	s := e.tlsUser()
	s.get("/signin")
	resp, _ = s.post("/signin", url.Values{"token": {acmeToken}})
	if c := sessionCookie(resp); c == nil || !c.Secure || !c.HttpOnly || c.SameSite != http.SameSiteStrictMode {
		t.Fatalf("session cookie over TLS: %+v", c)
	}
	if hsts := resp.Header.Get("Strict-Transport-Security"); hsts == "" {
		t.Fatal("no HSTS over TLS")
	}

	// Revoking the token ends the sessions opened with it.
	v := e.user()
	v.signIn(acmeToken)
	var tokenID string
	_ = e.pool.QueryRow(t.Context(), "SELECT id FROM api_tokens WHERE name = 'bootstrap' AND organisation_id = (SELECT id FROM organisations WHERE name = 'acme')").Scan(&tokenID)
	resp, _ = v.post("/org/tokens/"+tokenID+"/revoke", url.Values{"confirmed": {"1"}, "name": {"bootstrap"}})
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/signin" {
		t.Fatalf("revoking the session's own token: %d %s", resp.StatusCode, resp.Header.Get("Location"))
	}
	if resp, _ := s.get("/projects"); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("a session of a revoked token: %d", resp.StatusCode)
	}
}

func TestCSRF(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u, v := e.user(), e.user()
	u.signIn(acmeToken)
	v.signIn(acmeToken)
	if u.csrf == "" || u.csrf == v.csrf {
		t.Fatalf("CSRF tokens %q and %q", u.csrf, v.csrf)
	}
	create := url.Values{"name": {"web"}, "min_instances": {"1"}}
	with := func(csrf string) url.Values {
		f := url.Values{}
		for k, vs := range create {
			f[k] = vs
		}
		f.Set("csrf", csrf)
		return f
	}
	for what, form := range map[string]url.Values{"no token": create, "a forged token": with("forged"), "another session's token": with(v.csrf)} {
		if _, ok := form["csrf"]; !ok {
			form = with("")
		}
		resp, page := u.post("/projects", form)
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(page, "did not come from this console") {
			t.Errorf("%s: %d", what, resp.StatusCode)
		}
	}
	// A browser's cross-site POST is refused even with the right token.
	req, _ := http.NewRequest("POST", e.url+"/projects", strings.NewReader(with(u.csrf).Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Sec-Fetch-Site", "cross-site")
	if resp, _ := u.do(req); resp.StatusCode != http.StatusForbidden {
		t.Errorf("cross-site POST: %d", resp.StatusCode)
	}
	var n int
	_ = e.pool.QueryRow(t.Context(), "SELECT count(*) FROM projects").Scan(&n)
	if n != 0 {
		t.Fatalf("%d projects after refused forms", n)
	}
	if resp, _ := u.post("/projects", with(u.csrf)); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("with the session's token: %d", resp.StatusCode)
	}
}

// acmeFixture signs acme in and gives it a project with a live deployment,
// a variable and a domain.
func acmeFixture(t *testing.T, e *env) (u *user, projectID, deploymentID, domainID string) {
	t.Helper()
	u = e.user()
	u.signIn(acmeToken)
	if resp, page := u.post("/projects", url.Values{"name": {"web"}, "min_instances": {"1"}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("create project: %d %s", resp.StatusCode, page)
	}
	if resp, page := u.post("/projects/web/deployments", url.Values{"image": {e.images["v1"]}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("deploy: %d %s", resp.StatusCode, page)
	}
	if resp, _ := u.post("/projects/web/env", url.Values{"name": {"DB_PASSWORD"}, "value": {"hunter2-console-secret"}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("set env: %d", resp.StatusCode)
	}
	if resp, _ := u.post("/projects/web/domains", url.Values{"name": {"www.acme.test"}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("add domain: %d", resp.StatusCode)
	}
	_ = e.pool.QueryRow(t.Context(), "SELECT p.id, d.id FROM projects p JOIN deployments d ON d.project_id = p.id WHERE p.name = 'web'").Scan(&projectID, &deploymentID)
	_ = e.pool.QueryRow(t.Context(), "SELECT id FROM domains WHERE name = 'www.acme.test'").Scan(&domainID)
	return u, projectID, deploymentID, domainID
}

func TestCrossOrganisationIsNotFound(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	_, projectID, deploymentID, domainID := acmeFixture(t, e)
	var acmeTokenID string
	_ = e.pool.QueryRow(t.Context(), "SELECT id FROM api_tokens WHERE organisation_id = (SELECT id FROM organisations WHERE name = 'acme')").Scan(&acmeTokenID)

	o := e.user()
	o.signIn(otherToken)
	if resp, _ := o.post("/projects", url.Values{"name": {"mine"}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("other's project: %d", resp.StatusCode)
	}
	if _, page := o.get("/projects"); strings.Contains(page, ">web<") || !strings.Contains(page, ">mine<") {
		t.Fatal("the projects list crosses organisations")
	}
	confirmed := url.Values{"confirmed": {"1"}}
	for _, c := range []struct{ method, path string }{
		{"GET", "/projects/web"},
		{"GET", "/projects/" + projectID},
		{"GET", "/projects/" + projectID + "/deployments"},
		{"POST", "/projects/" + projectID + "/deployments"},
		{"POST", "/projects/" + projectID + "/env"},
		{"POST", "/projects/" + projectID + "/env/DB_PASSWORD/delete"},
		{"POST", "/projects/" + projectID + "/scale"},
		{"POST", "/projects/" + projectID + "/rollback"},
		{"POST", "/projects/mine/rollback?x"},
		{"POST", "/projects/mine/deployments/" + deploymentID + "/promote"},
		{"POST", "/projects/mine/deployments/" + deploymentID + "/stop"},
		{"POST", "/projects/mine/domains/" + domainID + "/verify"},
		{"POST", "/projects/mine/domains/" + domainID + "/delete"},
		{"POST", "/projects/mine/domains/www.acme.test/delete"},
		{"POST", "/org/tokens/" + acmeTokenID + "/revoke"},
	} {
		var resp *http.Response
		var page string
		if c.method == "GET" {
			resp, page = o.get(c.path)
		} else {
			form := url.Values{"image": {e.images["v1"]}, "name": {"X"}, "value": {"y"}, "min_instances": {"5"}}
			if strings.Contains(c.path, "rollback?x") {
				c.path = "/projects/mine/rollback"
				form.Set("deployment_id", deploymentID)
			}
			for k, v := range confirmed {
				form[k] = v
			}
			resp, page = o.post(c.path, form)
		}
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("%s %s by another organisation: %d", c.method, c.path, resp.StatusCode)
		}
		if strings.Contains(page, "acme.zeitwork.test") || strings.Contains(page, "DB_PASSWORD") {
			t.Errorf("%s %s: the 404 page shows acme's objects", c.method, c.path)
		}
	}
	// Nothing of acme's changed.
	var status string
	var minInst, envs, domains, tokens int
	_ = e.pool.QueryRow(t.Context(), "SELECT status FROM deployments WHERE id = $1", deploymentID).Scan(&status)
	_ = e.pool.QueryRow(t.Context(), "SELECT min_instances_per_region FROM projects WHERE id = $1", projectID).Scan(&minInst)
	_ = e.pool.QueryRow(t.Context(), "SELECT count(*) FROM project_env_vars WHERE project_id = $1", projectID).Scan(&envs)
	_ = e.pool.QueryRow(t.Context(), "SELECT count(*) FROM domains WHERE deleted_at IS NULL").Scan(&domains)
	_ = e.pool.QueryRow(t.Context(), "SELECT count(*) FROM api_tokens WHERE id = $1 AND deleted_at IS NULL", acmeTokenID).Scan(&tokens)
	if status == "stopped" || minInst != 1 || envs != 1 || domains != 1 || tokens != 1 {
		t.Fatalf("acme changed: status %s, min %d, %d vars, %d domains, %d tokens", status, minInst, envs, domains, tokens)
	}
}

// TestEscaping puts markup into every field that can carry it: pages show
// it as text.
func TestEscaping(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u, _, _, _ := acmeFixture(t, e)
	check := func(what, page string, n int) {
		t.Helper()
		if strings.Contains(page, fmt.Sprintf("<script>alert(%d)", n)) || strings.Contains(page, fmt.Sprintf("<img src=x onerror=alert(%d)", n)) {
			t.Errorf("%s: markup rendered unescaped", what)
		}
		if !strings.Contains(page, fmt.Sprintf("&lt;script&gt;alert(%d)", n)) && !strings.Contains(page, fmt.Sprintf("&lt;img src=x onerror=alert(%d)", n)) {
			t.Errorf("%s: the text is not shown", what)
		}
	}
	resp, page := u.post("/projects", url.Values{"name": {"<script>alert(1)</script>"}})
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("project named with markup: %d", resp.StatusCode)
	}
	check("project name", page, 1)
	resp, page = u.post("/projects/web/env", url.Values{"name": {"<script>alert(2)</script>"}, "value": {"x"}})
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("variable named with markup: %d", resp.StatusCode)
	}
	check("variable name", page, 2)
	resp, page = u.post("/org/tokens", url.Values{"name": {"<script>alert(3)</script>"}})
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("token named with markup: %d", resp.StatusCode)
	}
	check("new token", page, 3)
	_, page = u.get("/org")
	check("token list", page, 3)
	// An image reference is free text up to its first space.
	resp, _ = u.post("/projects/web/deployments", url.Values{"image": {"<script>alert(4)</script>"}})
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("image with markup: %d", resp.StatusCode)
	}
	_, page = u.get("/projects/web")
	check("project page", page, 4)
	_, page = u.get("/projects/web/deployments")
	check("deployments fragment", page, 4)
	resp, page = u.post("/projects/web/domains", url.Values{"name": {"<img src=x onerror=alert(5)>"}})
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("domain with markup: %d", resp.StatusCode)
	}
	check("domain", page, 5)
	resp, page = u.get("/<script>alert(6)</script>")
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown path: %d", resp.StatusCode)
	}
	check("not-found page", page, 6)
}

// TestEnvValuesNeverShown sets a variable and reads every page: the value
// appears nowhere, not even after a rejected form.
func TestEnvValuesNeverShown(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u, _, deploymentID, _ := acmeFixture(t, e)
	const secret = "hunter2-console-secret"
	resp, page := u.post("/projects/web/env", url.Values{"name": {"bad name"}, "value": {secret + "-2"}})
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(page, "not a valid variable name") {
		t.Fatalf("bad variable name: %d", resp.StatusCode)
	}
	if strings.Contains(page, secret) {
		t.Fatal("a rejected form shows the value")
	}
	resp, _ = u.post("/projects/web/env", url.Values{"name": {"API_KEY"}, "value": {secret + "-3"}})
	for _, c := range resp.Cookies() {
		if strings.Contains(c.Value, "hunter2") {
			t.Fatal("the value travels in a cookie")
		}
	}
	_, flash := u.follow(resp)
	if !strings.Contains(flash, "applies to the next deploy") {
		t.Fatal("no note that the value applies to the next deploy")
	}
	pages := []string{"/projects", "/projects/web", "/projects/web/deployments", "/org", "/projects/web/deployments/" + deploymentID}
	for _, p := range pages {
		_, page := u.get(p)
		if strings.Contains(page, "hunter2") {
			t.Errorf("%s shows a variable's value", p)
		}
	}
	_, page = u.get("/projects/web")
	if !strings.Contains(page, "DB_PASSWORD") || !strings.Contains(page, "API_KEY") {
		t.Fatal("variable names are not listed")
	}
	// The server-side confirmation page carries no value either.
	_, page = u.post("/projects/web/env/API_KEY/delete", nil)
	if !strings.Contains(page, "Are you sure?") || strings.Contains(page, "hunter2") {
		t.Fatal("confirmation page")
	}
}

// TestProjectPage drives a deployment through the console: live fragment,
// promote, roll back, stop, domains, scale and tokens.
func TestProjectPage(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u, _, first, _ := acmeFixture(t, e)
	fragment := func() (*http.Response, string) { return u.get("/projects/web/deployments") }
	statusOf := func(page, id string) string {
		m := regexp.MustCompile(`data-id="` + id + `" data-name="[^"]*" data-status="([a-z]+)"`).FindStringSubmatch(page)
		if m == nil {
			return ""
		}
		return m[1]
	}
	e.eventually("the first deployment is live on the page", func() bool {
		_, page := fragment()
		return statusOf(page, first) == "active"
	})
	resp, page := fragment()
	tag := resp.Header.Get("ETag")
	if tag == "" || strings.Contains(page, "<html") || !strings.Contains(page, "Production runs") {
		t.Fatalf("fragment: ETag %q", tag)
	}
	// Its instances by region and node: the node's hostname, state, health.
	table := regexp.MustCompile(`(?s)<table class="list compact instances" id="instances-` + first + `">.*?</table>`).FindString(page)
	for _, a := range e.agents {
		row := regexp.MustCompile(`(?s)<td data-label="Region">` + a.Region + `</td>\s*<td data-label="Node" class="mono" title="` + a.ID + `">h-` + a.ID[:8] +
			`</td>\s*<td data-label="State">running</td>\s*<td data-label="Health"><span class="badge st-active">healthy</span>`)
		if !row.MatchString(table) {
			t.Fatalf("no healthy instance in %s on node h-%s: %s", a.Region, a.ID[:8], table)
		}
	}
	req, _ := http.NewRequest("GET", e.url+"/projects/web/deployments", nil)
	req.Header.Set("If-None-Match", tag)
	if resp, _ := u.do(req); resp.StatusCode != http.StatusNotModified {
		t.Fatalf("unchanged fragment: %d", resp.StatusCode)
	}

	// A second deployment, through the API: it goes live and the first
	// one can be rolled back to.
	second := apiDeploy(t, e, acmeToken, "web", e.images["v2"])
	e.eventually("the second deployment is live", func() bool {
		_, page := fragment()
		return statusOf(page, second) == "active" && statusOf(page, first) == "superseded"
	})
	_, page = u.get("/projects/web")
	for _, want := range []string{`id="rollback-` + first + `"`, `id="stop-` + first + `"`, `id="rollback-previous"`, "created", "healthy", "active"} {
		if !strings.Contains(strings.ToLower(page), strings.ToLower(want)) {
			t.Errorf("project page lacks %s", want)
		}
	}
	// Without the script's confirmation the server asks.
	resp, page = u.post("/projects/web/rollback", url.Values{"deployment_id": {first}})
	if resp.StatusCode != 200 || !strings.Contains(page, "Are you sure?") || !strings.Contains(page, `name="confirmed" value="1"`) {
		t.Fatalf("rollback without confirmation: %d", resp.StatusCode)
	}
	resp, _ = u.post("/projects/web/rollback", url.Values{"deployment_id": {first}, "confirmed": {"1"}})
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("rollback: %d", resp.StatusCode)
	}
	if _, page := u.follow(resp); !strings.Contains(page, "serves production now") || statusOf(page, first) != "active" {
		t.Fatalf("after rollback: %s", statusOf(page, first))
	}
	// Promote forward again, then stop the one that is not live.
	resp, _ = u.post("/projects/web/deployments/"+second+"/promote", url.Values{"confirmed": {"1"}})
	if _, page := u.follow(resp); statusOf(page, second) != "active" {
		t.Fatal("promote")
	}
	resp, _ = u.post("/projects/web/deployments/"+second+"/stop", url.Values{"confirmed": {"1"}})
	if resp.StatusCode != http.StatusConflict {
		t.Fatalf("stopping production: %d", resp.StatusCode)
	}
	resp, _ = u.post("/projects/web/deployments/"+first+"/stop", url.Values{"confirmed": {"1"}})
	if _, page := u.follow(resp); statusOf(page, first) != "stopped" {
		t.Fatal("stop")
	}

	// Domains: the DNS records to create, then verification.
	_, page = u.get("/projects/web")
	for _, want := range []string{"www.acme.test", "CNAME", "edge.zeitwork.test", "_zeitwork.www.acme.test", "zeitwork-verify=", "not verified"} {
		if !strings.Contains(page, want) {
			t.Errorf("domains section lacks %q", want)
		}
	}
	var domainID string
	_ = e.pool.QueryRow(t.Context(), "SELECT id FROM domains").Scan(&domainID)
	resp, _ = u.post("/projects/web/domains/"+domainID+"/verify", nil)
	if _, page := u.follow(resp); !strings.Contains(page, "is not verified yet") {
		t.Fatal("verify before the record exists")
	}
	e.dns.SetCNAME("www.acme.test", "edge.zeitwork.test")
	resp, _ = u.post("/projects/web/domains/"+domainID+"/verify", nil)
	if _, page := u.follow(resp); !strings.Contains(page, "www.acme.test is verified") {
		t.Fatal("verify after the record exists")
	}

	// Scale.
	resp, page = u.post("/projects/web/scale", url.Values{"min_instances": {"0"}})
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(page, "min_instances_per_region must be 1-100") {
		t.Fatalf("scale to 0: %d", resp.StatusCode)
	}
	resp, _ = u.post("/projects/web/scale", url.Values{"min_instances": {"2"}})
	if _, page := u.follow(resp); !strings.Contains(page, `name="min_instances" type="number" min="1" max="100" required value="2"`) {
		t.Fatal("scale to 2")
	}

	// Tokens: the secret once, then never again.
	resp, page = u.post("/org/tokens", url.Values{"name": {"ci"}})
	m := regexp.MustCompile(`value="(zw_[0-9a-f]+)"`).FindStringSubmatch(page)
	if resp.StatusCode != http.StatusCreated || m == nil {
		t.Fatalf("create token: %d", resp.StatusCode)
	}
	if _, page := u.get("/org"); strings.Contains(page, m[1]) || !strings.Contains(page, ">ci<") {
		t.Fatal("token list")
	}
	if apiStatus(t, e, m[1], "GET", "/api/v1/whoami") != 200 {
		t.Fatal("the new token does not work")
	}
	var id string
	_ = e.pool.QueryRow(t.Context(), "SELECT id FROM api_tokens WHERE name = 'ci'").Scan(&id)
	resp, _ = u.post("/org/tokens/"+id+"/revoke", url.Values{"confirmed": {"1"}, "name": {"ci"}})
	if resp.StatusCode != http.StatusSeeOther || apiStatus(t, e, m[1], "GET", "/api/v1/whoami") != 401 {
		t.Fatal("revoke")
	}

	// The API keeps its own 404s; the console has its own.
	req, _ = http.NewRequest("GET", e.url+"/api/v1/nope", nil)
	if resp, _ := u.do(req); resp.StatusCode != 404 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("unknown API route: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if resp, page := u.get("/nope"); resp.StatusCode != 404 || !strings.Contains(page, "<h1>Not found</h1>") {
		t.Fatalf("unknown page: %d", resp.StatusCode)
	}
}

// TestBuildFromSource shows a deployment's build: its state and, when it
// failed, why (this operator has no BUILD_REGISTRY, so builds fail at once).
func TestBuildFromSource(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u := e.user()
	u.signIn(acmeToken)
	if resp, _ := u.post("/projects", url.Values{"name": {"api"}, "github_repo": {"acme/api"}, "min_instances": {"1"}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("create project: %d", resp.StatusCode)
	}
	_, page := u.get("/projects/api")
	if !strings.Contains(page, `name="commit_sha"`) || !strings.Contains(page, "built from the repository") {
		t.Fatal("a project that builds from source offers no commit field")
	}
	sha := strings.Repeat("3f2a", 10)
	if resp, page := u.post("/projects/api/deployments", url.Values{"commit_sha": {sha}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("deploy a commit: %d %s", resp.StatusCode, page)
	}
	e.eventually("the failed build on the page", func() bool {
		_, page := u.get("/projects/api/deployments")
		return strings.Contains(page, `class="badge b-failed"`) && strings.Contains(page, "build failed") &&
			strings.Contains(page, sha[:12]) && strings.Contains(page, "Build output")
	})
}

func apiStatus(t *testing.T, e *env, token, method, path string) int {
	t.Helper()
	req, _ := http.NewRequest(method, e.url+path, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// apiDeploy starts a deployment through the HTTP API and returns its id.
func apiDeploy(t testing.TB, e *env, token, project, image string) string {
	t.Helper()
	var d struct {
		ID string `json:"id"`
	}
	err := apiclient.New(e.url, token).Do(t.Context(), "POST", "/api/v1/projects/"+project+"/deployments",
		map[string]string{"image": image}, &d)
	if err != nil {
		t.Fatalf("deploy through the API: %v", err)
	}
	return d.ID
}
