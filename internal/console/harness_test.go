package console_test

import (
	"context"
	"html"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/zeitwork/zeitwork/internal/db"
	ib "github.com/zeitwork/zeitwork/internal/imagebuild"
	"github.com/zeitwork/zeitwork/internal/operator"
	"github.com/zeitwork/zeitwork/internal/operator/agents/agenttest"
	"github.com/zeitwork/zeitwork/internal/operator/domains/dnstest"
	"github.com/zeitwork/zeitwork/internal/pgtest"
)

const clusterToken = "cluster-secret"

// Known tokens of two organisations (bootstrap tokens: at least 20
// characters).
const (
	acmeToken  = "zw_console_test_acme_0123456789"
	otherToken = "zw_console_test_other_0123456789"
)

// env is a real operator (its API and its console on one server) on a
// fresh PostgreSQL database, with fake node agents in two regions and an
// OCI registry holding a few images.
type env struct {
	t      testing.TB
	url    string
	tls    *httptest.Server // the same handler over TLS
	pool   *pgxpool.Pool
	dns    *dnstest.Server
	images map[string]string // tag → pushed reference (by digest)
	agents []*agenttest.Agent
}

// newEnv starts the operator; builds from source fail at once (no
// BUILD_REGISTRY).
func newEnv(t testing.TB) *env { t.Helper(); return startEnv(t, false) }

// newBuildEnv starts the operator with a registry for built images and
// one build slot on the first node: a build runs there until the test
// ends it (agenttest's FinishBuild).
func newBuildEnv(t testing.TB) *env {
	t.Helper()
	e := startEnv(t, true)
	e.agents[0].SetMaxBuilds(1)
	e.eventually("the node reports its build slot", func() bool {
		var n int
		_ = e.pool.QueryRow(t.Context(), "SELECT coalesce(sum(max_builds), 0) FROM nodes").Scan(&n)
		return n == 1
	})
	return e
}

func startEnv(t testing.TB, builds bool) *env {
	t.Helper()
	dbURL := pgtest.URL(t)
	pool, err := db.Open(t.Context(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	e := &env{t: t, pool: pool, dns: dnstest.Start(t), images: map[string]string{}}
	cfg := operator.Config{DatabaseURL: dbURL, ClusterToken: clusterToken, EncryptionKey: "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
		AppsDomain: "zeitwork.test", EdgeHostname: "edge.zeitwork.test", DNSResolver: e.dns.Addr, DeployTimeout: time.Minute,
		Retention: time.Hour, NodeDownAfter: 15 * time.Second, ReconcileEvery: 200 * time.Millisecond, DomainRecheck: time.Hour,
		OrphanScanEvery: time.Minute}
	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(reg.Close)
	host := strings.TrimPrefix(reg.URL, "http://")
	if builds {
		cfg.BuildRegistry = host + "/built"
	}
	op, err := operator.New(cfg, pool, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	h := op.Handler(http.NotFoundHandler())
	srv := httptest.NewServer(h)
	e.tls = httptest.NewTLSServer(h)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = op.Run(ctx); close(done) }()
	t.Cleanup(func() { srv.Close(); e.tls.Close(); cancel(); <-done })
	e.url = srv.URL

	for _, org := range []struct{ name, token string }{{"acme", acmeToken}, {"other", otherToken}} {
		if err := op.BootstrapToken(t.Context(), org.name, "ops@"+org.name+".test", "bootstrap", org.token); err != nil {
			t.Fatal(err)
		}
	}

	for _, v := range []string{"v1", "v2"} {
		l, _ := ib.Layer(ib.Entry{Name: "version", Data: []byte(v)})
		img, _ := ib.Image(ib.Config{Cmd: []string{"/app"}}, l)
		ref, err := ib.Push(t.Context(), host+"/acme/web:"+v, img)
		if err != nil {
			t.Fatal(err)
		}
		e.images[v] = ref
	}

	for _, region := range []string{"eu-west", "us-east"} {
		e.agents = append(e.agents, agenttest.Start(t, region, e.url, clusterToken, func(string) bool { return false }))
	}
	agents := e.agents
	hctx, hcancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for hctx.Err() == nil {
			for _, a := range agents {
				a.Heartbeat()
			}
			time.Sleep(150 * time.Millisecond)
		}
	})
	t.Cleanup(func() { hcancel(); wg.Wait() })
	e.eventually("every node registered", func() bool {
		var n int
		_ = pool.QueryRow(t.Context(), "SELECT count(*) FROM nodes").Scan(&n)
		return n == len(agents)
	})
	return e
}

// eventually polls cond for up to a minute (a loaded machine is slow, not
// broken).
func (e *env) eventually(what string, cond func() bool) {
	e.t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out waiting: %s", what)
		}
	}
}

// user is a browser stand-in: a cookie jar that does not follow
// redirects, so tests see them.
type user struct {
	t    testing.TB
	base string
	hc   *http.Client
	csrf string // the session's CSRF token, read from the last page
}

func (e *env) user() *user {
	jar, _ := cookiejar.New(nil)
	return &user{t: e.t, base: e.url, hc: &http.Client{Jar: jar, Timeout: time.Minute,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
}

// tlsUser is a user of the console over HTTPS.
func (e *env) tlsUser() *user {
	u := e.user()
	u.base, u.hc.Transport = e.tls.URL, e.tls.Client().Transport
	return u
}

var csrfRE = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

func (u *user) do(req *http.Request) (*http.Response, string) {
	u.t.Helper()
	resp, err := u.hc.Do(req)
	if err != nil {
		u.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		u.t.Fatal(err)
	}
	if m := csrfRE.FindStringSubmatch(string(b)); m != nil {
		u.csrf = html.UnescapeString(m[1])
	}
	return resp, string(b)
}

func (u *user) get(path string) (*http.Response, string) {
	u.t.Helper()
	req, _ := http.NewRequest("GET", u.base+path, nil)
	return u.do(req)
}

// post sends a form with the CSRF token the user last saw (unless the
// form sets its own).
func (u *user) post(path string, form url.Values) (*http.Response, string) {
	u.t.Helper()
	if form == nil {
		form = url.Values{}
	}
	if _, ok := form["csrf"]; !ok {
		form.Set("csrf", u.csrf)
	}
	req, _ := http.NewRequest("POST", u.base+path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	return u.do(req)
}

// follow GETs where a redirect points.
func (u *user) follow(resp *http.Response) (*http.Response, string) {
	u.t.Helper()
	if resp.StatusCode != http.StatusSeeOther {
		u.t.Fatalf("%s %s: %d, want a redirect", resp.Request.Method, resp.Request.URL.Path, resp.StatusCode)
	}
	return u.get(resp.Header.Get("Location"))
}

func (u *user) signIn(token string) {
	u.t.Helper()
	u.get("/signin")
	resp, body := u.post("/signin", url.Values{"token": {token}})
	if resp.StatusCode != http.StatusSeeOther {
		u.t.Fatalf("sign in: %d %s", resp.StatusCode, body)
	}
	u.follow(resp)
}
