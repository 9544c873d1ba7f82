package operator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"

	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/console"
	"github.com/zeitwork/zeitwork/internal/httpjson"
)

// console is the web console, mounted on every path the API does not own
// (ADR 0700).
func (o *Operator) console() http.Handler {
	return console.New(console.Config{}, consoleBackend{o}, o.pool, o.log)
}

// consoleBackend runs the API's own handlers in-process for a console
// session: one implementation of every rule (validation, organisation
// scoping, transactions), whichever door a request comes through. The
// answer travels as the API's JSON document, decoded into the client's
// types; an error becomes a *console.Error with the API's status and
// message.
type consoleBackend struct{ o *Operator }

var _ console.Backend = consoleBackend{}

// bufferWriter collects a handler's answer.
type bufferWriter struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func (b *bufferWriter) Header() http.Header { return b.header }
func (b *bufferWriter) Write(p []byte) (int, error) {
	if b.code == 0 {
		b.code = http.StatusOK
	}
	return b.body.Write(p)
}
func (b *bufferWriter) WriteHeader(code int) {
	if b.code == 0 {
		b.code = code
	}
}

// call runs the API handler h for principal p with the path values and
// JSON body given, and decodes its answer into out (nil: discard).
func (c consoleBackend) call(ctx context.Context, p console.Principal, h func(http.ResponseWriter, *http.Request) error,
	method, query string, path map[string]string, body, out any) error {
	w := &bufferWriter{header: http.Header{}}
	if err := c.run(ctx, p, h, method, query, path, body, w); err != nil {
		return err
	}
	if out == nil || w.body.Len() == 0 {
		return nil
	}
	return json.Unmarshal(w.body.Bytes(), out)
}

// run runs the API handler h for principal p, its answer going to w; an
// error becomes a *console.Error as writeErr would answer it.
func (c consoleBackend) run(ctx context.Context, p console.Principal, h func(http.ResponseWriter, *http.Request) error,
	method, query string, path map[string]string, body any, w http.ResponseWriter) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	ctx = context.WithValue(ctx, ctxKey{}, principal{TokenID: p.TokenID, OrgID: p.OrgID, OrgName: p.OrgName})
	r, err := http.NewRequestWithContext(ctx, method, "/?"+query, rd)
	if err != nil {
		return err
	}
	for k, v := range path {
		r.SetPathValue(k, v)
	}
	if err := h(w, r); err != nil {
		// writeErr is the one place errors become statuses and messages.
		ew := &bufferWriter{header: http.Header{}}
		writeErr(ew, err)
		var e httpjson.ErrorBody
		_ = json.Unmarshal(ew.body.Bytes(), &e)
		ce := &console.Error{Status: ew.code, Code: e.Error.Code, Message: e.Error.Message}
		if ew.code >= 500 {
			c.o.log.Error("console call failed", "method", method, "err", err)
		}
		return ce
	}
	return nil
}

// streamWriter passes a streaming handler's answer on to w as it comes,
// flushing after each write; the handler's status and headers are the
// console's to set.
type streamWriter struct {
	header http.Header
	w      io.Writer
}

func (s *streamWriter) Header() http.Header { return s.header }
func (s *streamWriter) WriteHeader(int)     {}
func (s *streamWriter) Write(p []byte) (int, error) {
	n, err := s.w.Write(p)
	if f, ok := s.w.(http.Flusher); ok {
		f.Flush()
	}
	return n, err
}
func (s *streamWriter) Flush() {}

// Logs streams a deployment's build log or app log through the API's own
// handlers (buildLogs, deploymentLogs): the same scoping, the same lines.
func (c consoleBackend) Logs(ctx context.Context, p console.Principal, deployment, kind string, follow bool, w io.Writer) error {
	q := ""
	if follow {
		q = "follow=1"
	}
	sw := &streamWriter{header: http.Header{}, w: w}
	switch kind {
	case "build":
		d, err := c.Deployment(ctx, p, deployment)
		if err != nil {
			return err
		}
		if d.Build == nil {
			return &console.Error{Status: http.StatusNotFound, Code: "not_found", Message: "This deployment was not built from source: it has no build log."}
		}
		return c.run(ctx, p, c.o.buildLogs, "GET", q, map[string]string{"id": d.Build.ID}, nil, sw)
	case "app":
		return c.run(ctx, p, c.o.deploymentLogs, "GET", q, map[string]string{"id": deployment}, nil, sw)
	}
	return &console.Error{Status: http.StatusNotFound, Code: "not_found", Message: "There is no such log."}
}

func (c consoleBackend) Authenticate(ctx context.Context, token string) (console.Principal, error) {
	r, err := http.NewRequestWithContext(ctx, http.MethodGet, "/", nil)
	if err != nil {
		return console.Principal{}, err
	}
	r.Header.Set("Authorization", "Bearer "+token)
	return c.principal(c.o.authenticate(r))
}

// TokenPrincipal is authenticate for a token known by its hash (a console
// session's): the same query, the same last-used mark.
func (c consoleBackend) TokenPrincipal(ctx context.Context, tokenHash []byte) (console.Principal, error) {
	var p principal
	err := c.o.pool.QueryRow(ctx, Q("TokenLookup"), tokenHash).Scan(&p.TokenID, &p.OrgID, &p.OrgName)
	if isNoRows(err) {
		return console.Principal{}, console.ErrUnauthorized
	}
	if err != nil {
		return console.Principal{}, err
	}
	_, _ = c.o.pool.Exec(ctx, Q("TokenTouch"), p.TokenID)
	return console.Principal(p), nil
}

func (c consoleBackend) principal(p principal, err error) (console.Principal, error) {
	if errors.Is(err, errUnauthorized) {
		return console.Principal{}, console.ErrUnauthorized
	}
	if err != nil {
		return console.Principal{}, err
	}
	return console.Principal(p), nil
}

func (c consoleBackend) Projects(ctx context.Context, p console.Principal) ([]apiclient.Project, error) {
	var out struct {
		Projects []apiclient.Project `json:"projects"`
	}
	return out.Projects, c.call(ctx, p, c.o.listProjects, "GET", "", nil, nil, &out)
}

func (c consoleBackend) Project(ctx context.Context, p console.Principal, project string) (*apiclient.Project, error) {
	var out apiclient.Project
	return &out, c.call(ctx, p, c.o.getProject, "GET", "", map[string]string{"project": project}, nil, &out)
}

func (c consoleBackend) CreateProject(ctx context.Context, p console.Principal, spec apiclient.ProjectSpec) (*apiclient.Project, error) {
	var out apiclient.Project
	return &out, c.call(ctx, p, c.o.createProject, "POST", "", nil, spec, &out)
}

func (c consoleBackend) UpdateProject(ctx context.Context, p console.Principal, project string, spec apiclient.ProjectSpec) (*apiclient.Project, error) {
	var out apiclient.Project
	return &out, c.call(ctx, p, c.o.updateProject, "PATCH", "", map[string]string{"project": project}, spec, &out)
}

func (c consoleBackend) Deployments(ctx context.Context, p console.Principal, project string, limit int) ([]apiclient.DeploymentDetail, error) {
	var out struct {
		Deployments []apiclient.DeploymentDetail `json:"deployments"`
	}
	q := url.Values{"limit": {strconv.Itoa(limit)}}.Encode()
	return out.Deployments, c.call(ctx, p, c.o.listDeployments, "GET", q, map[string]string{"project": project}, nil, &out)
}

func (c consoleBackend) Deployment(ctx context.Context, p console.Principal, id string) (*apiclient.DeploymentDetail, error) {
	var out apiclient.DeploymentDetail
	return &out, c.call(ctx, p, c.o.getDeployment, "GET", "", map[string]string{"id": id}, nil, &out)
}

func (c consoleBackend) Deploy(ctx context.Context, p console.Principal, project string, req apiclient.DeployRequest) (*apiclient.DeploymentDetail, error) {
	var out apiclient.DeploymentDetail
	return &out, c.call(ctx, p, c.o.createDeployment, "POST", "", map[string]string{"project": project}, req, &out)
}

func (c consoleBackend) Promote(ctx context.Context, p console.Principal, id string) (*apiclient.DeploymentDetail, error) {
	var out apiclient.DeploymentDetail
	return &out, c.call(ctx, p, c.o.promoteDeployment, "POST", "", map[string]string{"id": id}, nil, &out)
}

func (c consoleBackend) Rollback(ctx context.Context, p console.Principal, project, id string) (*apiclient.DeploymentDetail, error) {
	var out apiclient.DeploymentDetail
	var body any
	if id != "" {
		body = map[string]string{"deployment_id": id}
	}
	return &out, c.call(ctx, p, c.o.rollback, "POST", "", map[string]string{"project": project}, body, &out)
}

func (c consoleBackend) Stop(ctx context.Context, p console.Principal, id string) (*apiclient.DeploymentDetail, error) {
	var out apiclient.DeploymentDetail
	return &out, c.call(ctx, p, c.o.stopDeployment, "POST", "", map[string]string{"id": id}, nil, &out)
}

func (c consoleBackend) Env(ctx context.Context, p console.Principal, project string) ([]apiclient.EnvVar, error) {
	var out struct {
		Env []apiclient.EnvVar `json:"env"`
	}
	return out.Env, c.call(ctx, p, c.o.listEnv, "GET", "", map[string]string{"project": project}, nil, &out)
}

func (c consoleBackend) SetEnv(ctx context.Context, p console.Principal, project string, vars map[string]string) error {
	return c.call(ctx, p, c.o.setEnv, "PUT", "", map[string]string{"project": project}, map[string]any{"vars": vars}, nil)
}

func (c consoleBackend) UnsetEnv(ctx context.Context, p console.Principal, project, name string) error {
	return c.call(ctx, p, c.o.unsetEnv, "DELETE", "", map[string]string{"project": project, "name": name}, nil, nil)
}

func (c consoleBackend) Domains(ctx context.Context, p console.Principal, project string) ([]apiclient.Domain, error) {
	var out struct {
		Domains []apiclient.Domain `json:"domains"`
	}
	return out.Domains, c.call(ctx, p, c.o.listDomains, "GET", "", map[string]string{"project": project}, nil, &out)
}

func (c consoleBackend) AddDomain(ctx context.Context, p console.Principal, project, name string) (*apiclient.Domain, error) {
	var out apiclient.Domain
	return &out, c.call(ctx, p, c.o.addDomain, "POST", "", map[string]string{"project": project}, map[string]string{"name": name}, &out)
}

func (c consoleBackend) VerifyDomain(ctx context.Context, p console.Principal, domain string) (*apiclient.Domain, error) {
	var out apiclient.Domain
	return &out, c.call(ctx, p, c.o.verifyDomain, "POST", "", map[string]string{"id": domain}, nil, &out)
}

func (c consoleBackend) RemoveDomain(ctx context.Context, p console.Principal, domain string) error {
	return c.call(ctx, p, c.o.removeDomain, "DELETE", "", map[string]string{"id": domain}, nil, nil)
}

func (c consoleBackend) Nodes(ctx context.Context, p console.Principal) ([]apiclient.Node, error) {
	var out struct {
		Nodes []apiclient.Node `json:"nodes"`
	}
	return out.Nodes, c.call(ctx, p, c.o.listNodes, "GET", "", nil, nil, &out)
}

func (c consoleBackend) Tokens(ctx context.Context, p console.Principal) ([]console.Token, error) {
	var out struct {
		Tokens []console.Token `json:"tokens"`
	}
	return out.Tokens, c.call(ctx, p, c.o.listTokens, "GET", "", nil, nil, &out)
}

func (c consoleBackend) CreateToken(ctx context.Context, p console.Principal, name string) (*apiclient.NewToken, error) {
	var out apiclient.NewToken
	return &out, c.call(ctx, p, c.o.createToken, "POST", "", nil, map[string]string{"name": name}, &out)
}

func (c consoleBackend) RevokeToken(ctx context.Context, p console.Principal, id string) error {
	return c.call(ctx, p, c.o.deleteToken, "DELETE", "", map[string]string{"id": id}, nil, nil)
}
