// Package console is Zeitwork's web console: server-rendered pages for
// projects, deployments, environment variables, domains, scaling and API
// tokens, served by the operator on every path outside /api/, /health and
// /metrics (ADR 0700).
//
// The console holds no rules of its own. Every operation goes through a
// Backend, which the operator implements by running its own API handlers
// in-process for the signed-in principal, so validation, organisation
// scoping and transactions are exactly the API's. The console adds what a
// browser needs: sessions opened with an API token (console_sessions,
// checked against the token on every request), CSRF tokens, a strict
// Content-Security-Policy and HTML escaping everywhere (html/template).
package console

import (
	"context"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

// Principal is who a session acts as: an API token of one organisation.
type Principal struct {
	TokenID uuid.UUID
	OrgID   uuid.UUID
	OrgName string
}

// Token is an API token as listed (never its secret).
type Token struct {
	ID         string     `json:"id"`
	Name       string     `json:"name"`
	CreatedAt  time.Time  `json:"created_at"`
	LastUsedAt *time.Time `json:"last_used_at"`
}

// Error is a failed operation as the API reports it: its HTTP status, its
// error code and its human message.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Message }

// ErrUnauthorized is what Authenticate and TokenPrincipal return for an
// unknown, revoked or expired token.
var ErrUnauthorized = &Error{Status: http.StatusUnauthorized, Code: "unauthorized", Message: "invalid or revoked token"}

// Backend is what the console needs of the operator: the API's operations
// for one principal, called in-process. Failures the API would answer with
// a 4xx are *Error values. project is a project's id or name, as in the
// API's paths.
type Backend interface {
	// Authenticate checks an API token exactly as the API checks a bearer
	// token.
	Authenticate(ctx context.Context, token string) (Principal, error)
	// TokenPrincipal checks a token by its SHA-256, as Authenticate does.
	TokenPrincipal(ctx context.Context, tokenHash []byte) (Principal, error)

	Projects(ctx context.Context, p Principal) ([]apiclient.Project, error)
	Project(ctx context.Context, p Principal, project string) (*apiclient.Project, error)
	CreateProject(ctx context.Context, p Principal, spec apiclient.ProjectSpec) (*apiclient.Project, error)
	UpdateProject(ctx context.Context, p Principal, project string, spec apiclient.ProjectSpec) (*apiclient.Project, error)

	// Deployments lists a project's newest deployments first.
	Deployments(ctx context.Context, p Principal, project string, limit int) ([]apiclient.DeploymentDetail, error)
	Deployment(ctx context.Context, p Principal, id string) (*apiclient.DeploymentDetail, error)
	Deploy(ctx context.Context, p Principal, project string, req apiclient.DeployRequest) (*apiclient.DeploymentDetail, error)
	Promote(ctx context.Context, p Principal, deployment string) (*apiclient.DeploymentDetail, error)
	// Rollback moves production back to deployment, or to the previous
	// healthy deployment when it is empty.
	Rollback(ctx context.Context, p Principal, project, deployment string) (*apiclient.DeploymentDetail, error)
	Stop(ctx context.Context, p Principal, deployment string) (*apiclient.DeploymentDetail, error)

	Env(ctx context.Context, p Principal, project string) ([]apiclient.EnvVar, error)
	SetEnv(ctx context.Context, p Principal, project string, vars map[string]string) error
	UnsetEnv(ctx context.Context, p Principal, project, name string) error

	Domains(ctx context.Context, p Principal, project string) ([]apiclient.Domain, error)
	AddDomain(ctx context.Context, p Principal, project, name string) (*apiclient.Domain, error)
	// VerifyDomain looks the domain up in DNS now; Verified and LastError
	// tell the outcome.
	VerifyDomain(ctx context.Context, p Principal, domain string) (*apiclient.Domain, error)
	RemoveDomain(ctx context.Context, p Principal, domain string) error

	// Logs writes a deployment's log to w as NDJSON, one
	// {"time","stream","line",...} per line: kind "build" is its build's
	// log (the API's builds/{id}/logs), "app" its instances' output (the
	// API's deployments/{id}/logs). follow keeps the stream open, a build's
	// until the build ends. An error comes before the first line.
	Logs(ctx context.Context, p Principal, deployment, kind string, follow bool, w io.Writer) error

	// Nodes lists the worker nodes (the deployment view names the node of
	// each instance).
	Nodes(ctx context.Context, p Principal) ([]apiclient.Node, error)

	Tokens(ctx context.Context, p Principal) ([]Token, error)
	CreateToken(ctx context.Context, p Principal, name string) (*apiclient.NewToken, error)
	RevokeToken(ctx context.Context, p Principal, id string) error
}

// Config configures the console.
type Config struct {
	// SessionTTL is how long a sign-in lasts (default 12h).
	SessionTTL time.Duration
	// Poll is how often the project page refreshes its deployments
	// (default 2s).
	Poll time.Duration
}

// Console serves the web console.
type Console struct {
	cfg     Config
	backend Backend
	pool    *pgxpool.Pool // console_sessions
	log     *slog.Logger
	h       http.Handler
	assets  map[string]asset
}

//go:embed static templates
var files embed.FS

// New builds the console on the operator's pool and backend.
func New(cfg Config, backend Backend, pool *pgxpool.Pool, log *slog.Logger) *Console {
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = 12 * time.Hour
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 2 * time.Second
	}
	c := &Console{cfg: cfg, backend: backend, pool: pool, log: log, assets: loadAssets()}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", c.home)
	mux.HandleFunc("GET /signin", c.signinPage)
	mux.HandleFunc("POST /signin", c.signin)
	mux.HandleFunc("GET /static/{file}", c.static)
	mux.HandleFunc("GET /favicon.ico", c.static)

	user := func(pattern string, h func(http.ResponseWriter, *http.Request, *session) error) {
		mux.HandleFunc(pattern, c.authed(h))
	}
	user("POST /signout", c.signout)
	user("GET /projects", c.projectsPage)
	user("POST /projects", c.createProject)
	user("GET /projects/{project}", c.projectPage)
	user(fragmentRoute, c.deploymentsFragment)
	user("POST /projects/{project}/deployments", c.deploy)
	user("POST /projects/{project}/rollback", c.rollback)
	user("POST /projects/{project}/deployments/{id}/promote", c.promote)
	user("POST /projects/{project}/deployments/{id}/stop", c.stop)
	user("GET /projects/{project}/deployments/{id}/logs/{kind}", c.logsPage)
	user(streamRoute, c.logsStream)
	user("GET /projects/{project}/deployments/{id}/logs/{kind}/text", c.logsText)
	user("POST /projects/{project}/env", c.setEnv)
	user("POST /projects/{project}/env/{name}/delete", c.unsetEnv)
	user("POST /projects/{project}/domains", c.addDomain)
	user("POST /projects/{project}/domains/{id}/verify", c.verifyDomain)
	user("POST /projects/{project}/domains/{id}/delete", c.removeDomain)
	user("POST /projects/{project}/scale", c.scale)
	user("GET /org", c.orgPage)
	user("POST /org/tokens", c.createToken)
	user("POST /org/tokens/{id}/revoke", c.revokeToken)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		c.renderError(w, r, nil, &Error{Status: http.StatusNotFound, Code: "not_found", Message: "There is no page at " + r.URL.Path + "."})
	})

	// Browsers say where a form came from (Sec-Fetch-Site, Origin): a
	// cross-site POST is refused before any handler runs. The per-session
	// CSRF token below is the check that does not depend on the browser.
	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.renderError(w, r, nil, &Error{Status: http.StatusForbidden, Code: "forbidden", Message: "Cross-site request refused."})
	}))
	c.h = cop.Handler(mux)
	return c
}

// contentSecurityPolicy allows scripts, styles, images and fetches from the
// console's own origin only: no inline script or style, no framing.
const contentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// ServeHTTP serves a console request with the security headers of every
// answer.
func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", contentSecurityPolicy)
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
	if r.TLS != nil {
		h.Set("Strict-Transport-Security", "max-age=31536000")
	}
	c.h.ServeHTTP(w, r)
}

// authed runs h for a signed-in session. Without one, pages redirect to
// the sign-in form and fragments answer 401. Every POST must carry the
// session's CSRF token.
func (c *Console) authed(h func(http.ResponseWriter, *http.Request, *session) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s, err := c.session(r)
		if err != nil {
			c.fail(w, r, nil, err)
			return
		}
		if s == nil {
			if r.Method == http.MethodGet && !isFragment(r) {
				http.Redirect(w, r, "/signin?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
				return
			}
			c.clearCookie(w, r, sessionCookie)
			c.renderError(w, r, nil, &Error{Status: http.StatusUnauthorized, Code: "unauthorized", Message: "Your session has ended. Sign in again."})
			return
		}
		if r.Method == http.MethodPost {
			r.Body = http.MaxBytesReader(w, r.Body, maxForm)
			if err := r.ParseForm(); err != nil {
				c.renderError(w, r, s, &Error{Status: http.StatusBadRequest, Code: "invalid_request", Message: "The form could not be read."})
				return
			}
			if !s.checkCSRF(r.PostForm.Get("csrf")) {
				c.renderError(w, r, s, &Error{Status: http.StatusForbidden, Code: "forbidden",
					Message: "The form has expired or did not come from this console. Reload the page and try again."})
				return
			}
		}
		if err := h(w, r, s); err != nil {
			c.fail(w, r, s, err)
		}
	}
}

// maxForm bounds a form body: an environment value is at most 64 KiB,
// three times that when URL-encoded.
const maxForm = 512 << 10

// fail renders err: an API error with its status and message, anything
// else as a logged 500 that shows no internals.
func (c *Console) fail(w http.ResponseWriter, r *http.Request, s *session, err error) {
	var e *Error
	if !errors.As(err, &e) || e.Status >= 500 {
		c.log.Error("console request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		e = &Error{Status: http.StatusInternalServerError, Code: "internal", Message: "Something went wrong on our side; it has been logged. Try again in a moment."}
	}
	c.renderError(w, r, s, e)
}

func (c *Console) home(w http.ResponseWriter, r *http.Request) {
	s, err := c.session(r)
	if err != nil {
		c.fail(w, r, nil, err)
		return
	}
	if s == nil {
		http.Redirect(w, r, "/signin", http.StatusSeeOther)
		return
	}
	http.Redirect(w, r, "/projects", http.StatusSeeOther)
}

// asset is an embedded static file with its content hash.
type asset struct {
	body        []byte
	contentType string
	version     string
}

func loadAssets() map[string]asset {
	out := map[string]asset{}
	entries, _ := fs.ReadDir(files, "static")
	for _, e := range entries {
		b, err := files.ReadFile("static/" + e.Name())
		if err != nil {
			panic(err) // embedded: cannot fail
		}
		sum := sha256.Sum256(b)
		ct := "application/octet-stream"
		switch {
		case strings.HasSuffix(e.Name(), ".css"):
			ct = "text/css; charset=utf-8"
		case strings.HasSuffix(e.Name(), ".js"):
			ct = "text/javascript; charset=utf-8"
		case strings.HasSuffix(e.Name(), ".svg"):
			ct = "image/svg+xml"
		}
		out[e.Name()] = asset{body: b, contentType: ct, version: hex.EncodeToString(sum[:6])}
	}
	return out
}

// assetURL is the versioned URL of a static file: a changed file gets a
// new URL, so browsers may cache each one for a year.
func (c *Console) assetURL(name string) string {
	return "/static/" + name + "?v=" + c.assets[name].version
}

func (c *Console) static(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("file")
	if r.URL.Path == "/favicon.ico" {
		name = "icon.svg"
	}
	a, ok := c.assets[name]
	if !ok {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", a.contentType)
	if r.URL.Query().Get("v") == a.version {
		w.Header().Set("Cache-Control", "public, max-age=31536000, immutable")
	} else {
		w.Header().Set("Cache-Control", "no-cache")
	}
	w.Header().Set("ETag", `"`+a.version+`"`)
	if r.Header.Get("If-None-Match") == `"`+a.version+`"` {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	_, _ = w.Write(a.body)
}

// fragmentRoute is the route of the deployments fragment the project page
// polls: its errors are plain text (the script reads the status), and a
// signed-out poll gets a 401 rather than the sign-in page.
const fragmentRoute = "GET /projects/{project}/deployments"

// streamRoute is the route of a followed log (NDJSON, read by the log
// page's script): like the fragment, a signed-out read gets a 401.
const streamRoute = "GET /projects/{project}/deployments/{id}/logs/{kind}/stream"

func isFragment(r *http.Request) bool { return r.Pattern == fragmentRoute || r.Pattern == streamRoute }

// projectPath is the console path of a project (by name: readable and
// stable, since projects cannot be renamed).
func projectPath(name string, rest ...string) string {
	p := "/projects/" + url.PathEscape(name)
	for _, s := range rest {
		p += "/" + url.PathEscape(s)
	}
	return p
}
