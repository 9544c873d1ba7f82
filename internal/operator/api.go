package operator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/httpjson"
	"github.com/zeitwork/zeitwork/internal/operator/builds"
	"github.com/zeitwork/zeitwork/internal/operator/names"
	"github.com/zeitwork/zeitwork/internal/operator/secrets"
	"github.com/zeitwork/zeitwork/internal/store"
)

// Error classes, mapped to HTTP status in writeErr only.
var (
	errInvalid      = errors.New("invalid")
	errNotFound     = errors.New("not_found")
	errConflict     = errors.New("conflict")
	errUnauthorized = errors.New("unauthorized")
	errForbidden    = errors.New("forbidden")
	errTooLarge     = errors.New("too_large")
)

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errInvalid, fmt.Sprintf(format, args...))
}

func notFound(what string) error { return fmt.Errorf("%w: %s not found", errNotFound, what) }

func writeErr(w http.ResponseWriter, err error) {
	code, class := http.StatusInternalServerError, "internal"
	switch {
	case errors.Is(err, errInvalid):
		code, class = http.StatusBadRequest, "invalid_request"
	case errors.Is(err, errNotFound):
		code, class = http.StatusNotFound, "not_found"
	case errors.Is(err, errConflict):
		code, class = http.StatusConflict, "conflict"
	case errors.Is(err, errUnauthorized):
		code, class = http.StatusUnauthorized, "unauthorized"
	case errors.Is(err, errForbidden):
		code, class = http.StatusForbidden, "forbidden"
	case errors.Is(err, errTooLarge):
		code, class = http.StatusRequestEntityTooLarge, "too_large"
	}
	var e httpjson.ErrorBody
	e.Error.Code = class
	msg := err.Error()
	for _, p := range []string{"invalid: ", "not_found: ", "conflict: ", "unauthorized: ", "forbidden: ", "too_large: "} {
		msg = strings.TrimPrefix(msg, p)
	}
	if code == 500 {
		msg = "internal error: " + msg
	}
	e.Error.Message = msg
	httpjson.Write(w, code, e)
}

// decode reads a JSON body strictly: unknown fields and trailing data are
// errors.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return invalid("request body is empty; JSON expected")
		}
		return invalid("malformed JSON: %v", err)
	}
	if dec.More() {
		return invalid("malformed JSON: trailing data after the object")
	}
	return nil
}

type principal struct {
	TokenID uuid.UUID
	OrgID   uuid.UUID
	OrgName string
}

type ctxKey struct{}

func who(r *http.Request) principal { return r.Context().Value(ctxKey{}).(principal) }

// Handler is the operator's HTTP API; admin serves /health and /metrics.
func (o *Operator) Handler(admin http.Handler) http.Handler {
	mux := http.NewServeMux()
	user := func(pattern string, h func(http.ResponseWriter, *http.Request) error) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			p, err := o.authenticate(r)
			if err != nil {
				writeErr(w, err)
				return
			}
			if err := h(w, r.WithContext(context.WithValue(r.Context(), ctxKey{}, p))); err != nil {
				writeErr(w, err)
			}
		})
	}
	internal := func(pattern string, h func(http.ResponseWriter, *http.Request) error) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
			if subtle.ConstantTimeCompare([]byte(tok), []byte(o.cfg.ClusterToken)) != 1 {
				writeErr(w, fmt.Errorf("%w: cluster token required", errUnauthorized))
				return
			}
			if err := h(w, r); err != nil {
				writeErr(w, err)
			}
		})
	}
	user("GET /api/v1/whoami", o.whoami)
	user("POST /api/v1/organisations", o.createOrganisation)
	user("GET /api/v1/members", o.listMembers)
	user("DELETE /api/v1/members/{id}", o.removeMember)
	user("POST /api/v1/members", o.addMember)
	user("GET /api/v1/tokens", o.listTokens)
	user("POST /api/v1/tokens", o.createToken)
	user("DELETE /api/v1/tokens/{id}", o.deleteToken)
	user("GET /api/v1/projects", o.listProjects)
	user("POST /api/v1/projects", o.createProject)
	user("GET /api/v1/projects/{project}", o.getProject)
	user("PATCH /api/v1/projects/{project}", o.updateProject)
	user("DELETE /api/v1/projects/{project}", o.deleteProject)
	user("GET /api/v1/projects/{project}/env", o.listEnv)
	user("PUT /api/v1/projects/{project}/env", o.setEnv)
	user("DELETE /api/v1/projects/{project}/env/{name}", o.unsetEnv)
	user("GET /api/v1/projects/{project}/deployments", o.listDeployments)
	user("POST /api/v1/projects/{project}/sources", o.uploadSource)
	user("GET /api/v1/projects/{project}/builds", o.listBuilds)
	user("GET /api/v1/builds/{id}", o.getBuild)
	user("GET /api/v1/builds/{id}/logs", o.buildLogs)
	user("POST /api/v1/projects/{project}/deployments", o.createDeployment)
	user("POST /api/v1/projects/{project}/rollback", o.rollback)
	user("GET /api/v1/projects/{project}/domains", o.listDomains)
	user("POST /api/v1/projects/{project}/domains", o.addDomain)
	user("GET /api/v1/deployments/{id}", o.getDeployment)
	user("POST /api/v1/deployments/{id}/stop", o.stopDeployment)
	user("POST /api/v1/deployments/{id}/promote", o.promoteDeployment)
	user("GET /api/v1/deployments/{id}/logs", o.deploymentLogs)
	user("GET /api/v1/domains/{id}", o.getDomain)
	user("POST /api/v1/domains/{id}/verify", o.verifyDomain)
	user("DELETE /api/v1/domains/{id}", o.removeDomain)
	user("GET /api/v1/instances", o.listInstances)
	user("GET /api/v1/nodes", o.listNodes)
	// Nodes are shared by every organisation: changing them takes the
	// cluster token or a token of an organisation in ADMIN_ORGS.
	adminOnly := func(pattern string, h func(http.ResponseWriter, *http.Request) error) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
			if subtle.ConstantTimeCompare([]byte(tok), []byte(o.cfg.ClusterToken)) != 1 {
				p, err := o.authenticate(r)
				if err != nil {
					writeErr(w, err)
					return
				}
				if !slices.Contains(o.cfg.AdminOrgs, p.OrgName) {
					writeErr(w, fmt.Errorf("%w: changing nodes takes the cluster token or a token of an organisation in ADMIN_ORGS", errForbidden))
					return
				}
			}
			if err := h(w, r); err != nil {
				writeErr(w, err)
			}
		})
	}
	adminOnly("POST /api/v1/nodes/{id}/drain", o.setNodeState("draining"))
	adminOnly("POST /api/v1/nodes/{id}/enable", o.setNodeState("ready"))
	adminOnly("DELETE /api/v1/nodes/{id}", o.removeNode)
	user("GET /api/v1/regions", o.listRegions)
	internal("GET /api/v1/routes", o.routes)
	internal("POST /api/v1/internal/nodes/register", o.nodeHeartbeat)
	internal("POST /api/v1/internal/nodes/{id}/heartbeat", o.nodeHeartbeat)
	internal("POST /api/v1/internal/edges/heartbeat", o.edgeHeartbeat)
	internal("GET /api/v1/internal/edges", o.listEdges)
	internal("GET /api/v1/internal/sources/{id}", o.downloadSource)
	mux.HandleFunc("POST /api/v1/github/webhook", o.webhook)
	mux.Handle("/health", admin)
	mux.Handle("/health/", admin)
	mux.Handle("/metrics", admin)
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, fmt.Errorf("%w: no route %s %s", errNotFound, r.Method, r.URL.Path))
	})
	mux.Handle("/", o.console()) // the web console (internal/console)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rw := &statusWriter{ResponseWriter: w, code: 200}
		mux.ServeHTTP(rw, r) // sets r.Pattern: the route, a bounded label
		class := strconv.Itoa(rw.code/100) + "xx"
		o.m.requests.WithLabelValues(class).Inc()
		route := r.Pattern
		if route == "" {
			route = "unmatched"
		}
		o.m.latency.WithLabelValues(route, class).Observe(time.Since(start).Seconds())
	})
}

type statusWriter struct {
	http.ResponseWriter
	code int
}

func (s *statusWriter) WriteHeader(code int) { s.code = code; s.ResponseWriter.WriteHeader(code) }
func (s *statusWriter) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (o *Operator) authenticate(r *http.Request) (principal, error) {
	h := r.Header.Get("Authorization")
	tok, ok := strings.CutPrefix(h, "Bearer ")
	if !ok || tok == "" {
		return principal{}, fmt.Errorf("%w: missing bearer token (Authorization: Bearer <token>)", errUnauthorized)
	}
	var p principal
	err := o.pool.QueryRow(r.Context(), Q("TokenLookup"), secrets.HashToken(tok)).Scan(&p.TokenID, &p.OrgID, &p.OrgName)
	if isNoRows(err) {
		return principal{}, fmt.Errorf("%w: invalid or revoked token", errUnauthorized)
	}
	if err != nil {
		return principal{}, err
	}
	_, _ = o.pool.Exec(r.Context(), Q("TokenTouch"), p.TokenID)
	return p, nil
}

// Bootstrap creates an organisation (if absent), an owner and a new API
// token for it, and returns the token. `zeitwork-operator bootstrap` uses it.
func (o *Operator) Bootstrap(ctx context.Context, org, email, tokenName string) (string, error) {
	tok, _ := secrets.NewToken()
	return tok, o.BootstrapToken(ctx, org, email, tokenName, tok)
}

// BootstrapToken is the idempotent form of Bootstrap: the organisation,
// the owner and the given token exist afterwards, however often (and
// however concurrently) it runs. `make dev`, tests and BOOTSTRAP_TOKEN use
// it to have a token known in advance.
func (o *Operator) BootstrapToken(ctx context.Context, org, email, tokenName, token string) error {
	if err := names.ValidLabel(org); err != nil {
		return fmt.Errorf("organisation: %w", err)
	}
	if !emailRE.MatchString(email) {
		return fmt.Errorf("email %q is not valid", email)
	}
	if len(token) < 20 || strings.ContainsAny(token, " \t\r\n") {
		return fmt.Errorf("a bootstrap token needs at least 20 characters and no spaces")
	}
	return o.tx(ctx, func(tx pgx.Tx) error {
		var orgID uuid.UUID
		if err := tx.QueryRow(ctx, Q("OrgUpsert"), newID(), org).Scan(&orgID); err != nil {
			return err
		}
		var userID uuid.UUID
		if err := tx.QueryRow(ctx, Q("UserUpsert"), newID(), email).Scan(&userID); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, Q("MembershipUpsert"), orgID, userID, "owner"); err != nil {
			return err
		}
		var tokenOrg uuid.UUID
		err := tx.QueryRow(ctx, Q("TokenEnsure"), newID(), orgID, userID, tokenName, secrets.HashToken(token)).Scan(&tokenOrg)
		if err != nil {
			return err
		}
		if tokenOrg != orgID {
			return fmt.Errorf("the bootstrap token already belongs to another organisation")
		}
		return nil
	})
}

// createOrganisation creates another organisation with owner_email as its
// owner and answers with a first token for it (shown once): tokens are
// scoped to one organisation, so the caller's token does not reach it.
func (o *Operator) createOrganisation(w http.ResponseWriter, r *http.Request) error {
	var req struct {
		Name       string `json:"name"`
		OwnerEmail string `json:"owner_email"`
	}
	if err := decode(r, &req); err != nil {
		return err
	}
	if err := names.ValidLabel(req.Name); err != nil {
		return invalid("%v", err)
	}
	if !emailRE.MatchString(req.OwnerEmail) {
		return invalid("owner_email %q is not valid", req.OwnerEmail)
	}
	id := newID()
	tok, hash := secrets.NewToken()
	err := o.tx(r.Context(), func(tx pgx.Tx) error {
		if _, err := tx.Exec(r.Context(), Q("OrgInsert"), id, req.Name); err != nil {
			return err
		}
		var uid uuid.UUID
		if err := tx.QueryRow(r.Context(), Q("UserUpsert"), newID(), req.OwnerEmail).Scan(&uid); err != nil {
			return err
		}
		if _, err := tx.Exec(r.Context(), Q("MembershipUpsert"), id, uid, "owner"); err != nil {
			return err
		}
		_, err := tx.Exec(r.Context(), Q("TokenInsert"), newID(), id, "first token", hash)
		return err
	})
	if db.IsUniqueViolation(err) {
		return fmt.Errorf("%w: an organisation named %q already exists", errConflict, req.Name)
	}
	if err != nil {
		return err
	}
	httpjson.Write(w, 201, map[string]any{"id": id, "name": req.Name, "token": tok, "note": "store this token now: it is not shown again"})
	return nil
}

func (o *Operator) removeMember(w http.ResponseWriter, r *http.Request) error {
	id, err := uuid.Parse(r.PathValue("id"))
	if err != nil {
		return notFound("member " + r.PathValue("id"))
	}
	var owners int
	err = o.tx(r.Context(), func(tx pgx.Tx) error {
		tag, err := tx.Exec(r.Context(), Q("MembershipDelete"), who(r).OrgID, id)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return notFound("member " + id.String())
		}
		if err := tx.QueryRow(r.Context(), Q("OwnersCount"), who(r).OrgID).Scan(&owners); err != nil {
			return err
		}
		if owners == 0 {
			return fmt.Errorf("%w: an organisation keeps at least one owner", errConflict)
		}
		return nil
	})
	if err != nil {
		return err
	}
	w.WriteHeader(204)
	return nil
}

func (o *Operator) whoami(w http.ResponseWriter, r *http.Request) error {
	p := who(r)
	httpjson.Write(w, 200, map[string]any{"organisation": p.OrgName, "organisation_id": p.OrgID, "token_id": p.TokenID})
	return nil
}

func (o *Operator) listMembers(w http.ResponseWriter, r *http.Request) error {
	rows, err := o.pool.Query(r.Context(), Q("MembersList"), who(r).OrgID)
	if err != nil {
		return err
	}
	type member struct {
		ID        uuid.UUID `json:"id"`
		Email     string    `json:"email"`
		Role      string    `json:"role"`
		CreatedAt time.Time `json:"created_at"`
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (member, error) {
		var m member
		return m, row.Scan(&m.ID, &m.Email, &m.Role, &m.CreatedAt)
	})
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, map[string]any{"members": out})
	return nil
}

var emailRE = regexp.MustCompile(`^[^@\s]+@[^@\s]+\.[^@\s]+$`)

func (o *Operator) addMember(w http.ResponseWriter, r *http.Request) error {
	var req struct {
		Email string `json:"email"`
		Role  string `json:"role"`
	}
	if err := decode(r, &req); err != nil {
		return err
	}
	if !emailRE.MatchString(req.Email) {
		return invalid("email %q is not valid", req.Email)
	}
	if req.Role == "" {
		req.Role = "member"
	}
	if req.Role != "owner" && req.Role != "admin" && req.Role != "member" {
		return invalid("role must be owner, admin or member")
	}
	err := o.tx(r.Context(), func(tx pgx.Tx) error {
		var uid uuid.UUID
		if err := tx.QueryRow(r.Context(), Q("UserUpsert"), newID(), req.Email).Scan(&uid); err != nil {
			return err
		}
		_, err := tx.Exec(r.Context(), Q("MembershipUpsert"), who(r).OrgID, uid, req.Role)
		return err
	})
	if err != nil {
		return err
	}
	httpjson.Write(w, 201, map[string]any{"email": req.Email, "role": req.Role})
	return nil
}

func (o *Operator) listTokens(w http.ResponseWriter, r *http.Request) error {
	rows, err := o.pool.Query(r.Context(), Q("TokensList"), who(r).OrgID)
	if err != nil {
		return err
	}
	type token struct {
		ID         uuid.UUID  `json:"id"`
		Name       string     `json:"name"`
		CreatedAt  time.Time  `json:"created_at"`
		LastUsedAt *time.Time `json:"last_used_at"`
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (token, error) {
		var t token
		return t, row.Scan(&t.ID, &t.Name, &t.CreatedAt, &t.LastUsedAt)
	})
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, map[string]any{"tokens": out})
	return nil
}

func (o *Operator) createToken(w http.ResponseWriter, r *http.Request) error {
	var req struct {
		Name string `json:"name"`
	}
	if err := decode(r, &req); err != nil {
		return err
	}
	if len(req.Name) > 100 {
		return invalid("name is longer than 100 characters")
	}
	tok, hash := secrets.NewToken()
	id := newID()
	if _, err := o.pool.Exec(r.Context(), Q("TokenInsert"), id, who(r).OrgID, req.Name, hash); err != nil {
		return err
	}
	httpjson.Write(w, 201, map[string]any{"id": id, "name": req.Name, "token": tok, "note": "store this token now: it is not shown again"})
	return nil
}

func (o *Operator) deleteToken(w http.ResponseWriter, r *http.Request) error {
	id, err := uuid.Parse(r.PathValue("id"))
	if err != nil {
		return notFound("token")
	}
	tag, err := o.pool.Exec(r.Context(), Q("TokenDelete"), id, who(r).OrgID)
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return notFound("token")
	}
	w.WriteHeader(204)
	return nil
}

// Project is the API's project document.
type Project struct {
	ID                    uuid.UUID  `json:"id"`
	Name                  string     `json:"name"`
	GithubRepo            string     `json:"github_repo"`
	GithubBranch          string     `json:"github_branch"`
	ImageTemplate         string     `json:"image_template"`
	Port                  int        `json:"port"`
	HealthPath            string     `json:"health_path"`
	MinInstancesPerRegion int        `json:"min_instances_per_region"`
	VCPUs                 int        `json:"vcpus"`
	MemoryMiB             int        `json:"memory_mib"`
	ActiveDeploymentID    *uuid.UUID `json:"active_deployment_id"`
	ProductionURL         string     `json:"production_url"`
	CreatedAt             time.Time  `json:"created_at"`
	// Builds from source: a project with a repository and no image
	// template builds each deployment from its Dockerfile.
	GitURL           string `json:"git_url"`
	Dockerfile       string `json:"dockerfile"`    // relative to BuildContext
	BuildContext     string `json:"build_context"` // relative to the repository root
	GitTokenSet      bool   `json:"git_token_set"` // the token itself is write-only
	BuildsFromSource bool   `json:"builds_from_source"`
}

// buildsFromSource reports whether commits of the project are built (it
// has a repository and no image template).
func (p *Project) buildsFromSource() bool {
	return p.ImageTemplate == "" && (p.GithubRepo != "" || p.GitURL != "")
}

func scanProject(row pgx.Row, p *Project) error {
	err := row.Scan(&p.ID, &p.Name, &p.GithubRepo, &p.GithubBranch, &p.ImageTemplate, &p.Port, &p.HealthPath,
		&p.MinInstancesPerRegion, &p.VCPUs, &p.MemoryMiB, &p.ActiveDeploymentID, &p.CreatedAt,
		&p.GitURL, &p.Dockerfile, &p.BuildContext, &p.GitTokenSet)
	p.BuildsFromSource = p.buildsFromSource()
	return err
}

func (o *Operator) project(r *http.Request) (*Project, error) {
	var p Project
	err := scanProject(o.pool.QueryRow(r.Context(), Q("ProjectGet"), who(r).OrgID, r.PathValue("project")), &p)
	if isNoRows(err) {
		return nil, notFound("project " + r.PathValue("project"))
	}
	if err != nil {
		return nil, err
	}
	p.ProductionURL = "https://" + names.AliasLabel(p.Name, who(r).OrgName) + "." + o.cfg.AppsDomain
	return &p, nil
}

type projectInput struct {
	Name                  *string `json:"name"`
	GithubRepo            *string `json:"github_repo"`
	GithubBranch          *string `json:"github_branch"`
	ImageTemplate         *string `json:"image_template"`
	Port                  *int    `json:"port"`
	HealthPath            *string `json:"health_path"`
	MinInstancesPerRegion *int    `json:"min_instances_per_region"`
	VCPUs                 *int    `json:"vcpus"`
	MemoryMiB             *int    `json:"memory_mib"`
	GitURL                *string `json:"git_url"`
	Dockerfile            *string `json:"dockerfile"`
	BuildContext          *string `json:"build_context"`
	GitToken              *string `json:"git_token"` // write-only; "" clears it
}

var repoRE = regexp.MustCompile(`^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$`)

// apply merges in into p and validates the result, naming every problem.
func (in *projectInput) apply(p *Project) error {
	set := func(dst *string, src *string) {
		if src != nil {
			*dst = strings.TrimSpace(*src)
		}
	}
	set(&p.GithubRepo, in.GithubRepo)
	set(&p.GithubBranch, in.GithubBranch)
	set(&p.ImageTemplate, in.ImageTemplate)
	set(&p.HealthPath, in.HealthPath)
	set(&p.GitURL, in.GitURL)
	set(&p.Dockerfile, in.Dockerfile)
	set(&p.BuildContext, in.BuildContext)
	for dst, src := range map[*int]*int{&p.Port: in.Port, &p.MinInstancesPerRegion: in.MinInstancesPerRegion, &p.VCPUs: in.VCPUs, &p.MemoryMiB: in.MemoryMiB} {
		if src != nil {
			*dst = *src
		}
	}
	var probs []string
	if p.GithubRepo != "" && !repoRE.MatchString(p.GithubRepo) {
		probs = append(probs, fmt.Sprintf("github_repo %q must be owner/name", p.GithubRepo))
	}
	if p.GithubBranch == "" || strings.ContainsAny(p.GithubBranch, " ~^:?*[\\") {
		probs = append(probs, "github_branch is not a valid branch name")
	}
	if p.ImageTemplate != "" && strings.ContainsAny(p.ImageTemplate, " \t") {
		probs = append(probs, "image_template must not contain spaces")
	}
	if p.Port < 1 || p.Port > 65535 {
		probs = append(probs, "port must be 1-65535")
	}
	if !strings.HasPrefix(p.HealthPath, "/") {
		probs = append(probs, "health_path must start with /")
	}
	if p.MinInstancesPerRegion < 1 || p.MinInstancesPerRegion > 100 {
		probs = append(probs, "min_instances_per_region must be 1-100")
	}
	if p.VCPUs < 1 || p.VCPUs > 32 {
		probs = append(probs, "vcpus must be 1-32")
	}
	if p.MemoryMiB < 96 || p.MemoryMiB > 65536 {
		probs = append(probs, "memory_mib must be 96-65536")
	}
	if err := builds.ValidGitURL(p.GitURL); err != nil {
		probs = append(probs, err.Error())
	}
	if err := build.RelPath(p.Dockerfile); err != nil {
		probs = append(probs, "dockerfile: "+err.Error()+" (relative to build_context)")
	}
	if err := build.RelPath(p.BuildContext); err != nil {
		probs = append(probs, "build_context: "+err.Error())
	}
	if in.GitToken != nil && (len(*in.GitToken) > 4096 || strings.ContainsAny(*in.GitToken, "\x00\r\n")) {
		probs = append(probs, "git_token must be at most 4096 characters on one line")
	}
	p.BuildsFromSource = p.buildsFromSource()
	if len(probs) > 0 {
		return invalid("%s", strings.Join(probs, "; "))
	}
	return nil
}

func (o *Operator) createProject(w http.ResponseWriter, r *http.Request) error {
	var in projectInput
	if err := decode(r, &in); err != nil {
		return err
	}
	if in.Name == nil {
		return invalid("name is required")
	}
	if err := names.ValidLabel(*in.Name); err != nil {
		return invalid("%v", err)
	}
	p := Project{ID: newID(), Name: *in.Name, GithubBranch: "main", Port: 8080, HealthPath: "/", MinInstancesPerRegion: 3, VCPUs: 1, MemoryMiB: 128,
		Dockerfile: "Dockerfile", BuildContext: "."}
	if err := in.apply(&p); err != nil {
		return err
	}
	err := o.tx(r.Context(), func(tx pgx.Tx) error {
		_, err := tx.Exec(r.Context(), Q("ProjectInsert"), p.ID, who(r).OrgID, p.Name, p.GithubRepo, p.GithubBranch, p.ImageTemplate,
			p.Port, p.HealthPath, p.MinInstancesPerRegion, p.VCPUs, p.MemoryMiB, p.GitURL, p.Dockerfile, p.BuildContext)
		if err != nil {
			return err
		}
		return o.setGitToken(r.Context(), tx, &p, in.GitToken)
	})
	if db.IsUniqueViolation(err) {
		return fmt.Errorf("%w: a project named %q already exists", errConflict, p.Name)
	}
	if err != nil {
		return err
	}
	p.CreatedAt = time.Now().UTC()
	p.ProductionURL = "https://" + names.AliasLabel(p.Name, who(r).OrgName) + "." + o.cfg.AppsDomain
	httpjson.Write(w, 201, p)
	return nil
}

func (o *Operator) listProjects(w http.ResponseWriter, r *http.Request) error {
	rows, err := o.pool.Query(r.Context(), Q("ProjectsList"), who(r).OrgID)
	if err != nil {
		return err
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Project, error) {
		var p Project
		err := scanProject(row, &p)
		p.ProductionURL = "https://" + names.AliasLabel(p.Name, who(r).OrgName) + "." + o.cfg.AppsDomain
		return p, err
	})
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, map[string]any{"projects": out})
	return nil
}

func (o *Operator) getProject(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, p)
	return nil
}

func (o *Operator) updateProject(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	var in projectInput
	if err := decode(r, &in); err != nil {
		return err
	}
	if in.Name != nil && *in.Name != p.Name {
		return invalid("a project cannot be renamed (its name is part of every deployment URL)")
	}
	if err := in.apply(p); err != nil {
		return err
	}
	err = o.tx(r.Context(), func(tx pgx.Tx) error {
		if _, err := tx.Exec(r.Context(), Q("ProjectUpdate"), p.ID, who(r).OrgID, p.GithubRepo, p.GithubBranch, p.ImageTemplate,
			p.Port, p.HealthPath, p.MinInstancesPerRegion, p.VCPUs, p.MemoryMiB, p.GitURL, p.Dockerfile, p.BuildContext); err != nil {
			return err
		}
		return o.setGitToken(r.Context(), tx, p, in.GitToken)
	})
	if err != nil {
		return err
	}
	o.notify(r.Context(), "zeitwork_reconcile")
	httpjson.Write(w, 200, p)
	return nil
}

// setGitToken seals and stores a project's git token (write-only; ""
// clears it); nil leaves it as it is.
func (o *Operator) setGitToken(ctx context.Context, tx pgx.Tx, p *Project, token *string) error {
	if token == nil {
		return nil
	}
	var nonce, ct []byte
	if *token != "" {
		nonce, ct = o.seal.Seal(p.ID.String(), builds.GitTokenName, *token)
	}
	if _, err := tx.Exec(ctx, Q("ProjectSetGitToken"), p.ID, nonce, ct); err != nil {
		return err
	}
	p.GitTokenSet = *token != ""
	return nil
}

func (o *Operator) deleteProject(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	err = o.tx(r.Context(), func(tx pgx.Tx) error {
		if _, err := tx.Exec(r.Context(), Q("ProjectDelete"), p.ID, who(r).OrgID); err != nil {
			return err
		}
		if _, err := tx.Exec(r.Context(), Q("ProjectStopDeployments"), p.ID); err != nil {
			return err
		}
		if _, err := tx.Exec(r.Context(), Q("ProjectDeleteDomains"), p.ID); err != nil {
			return err
		}
		if _, err := tx.Exec(r.Context(), Q("ProjectStopInstances"), p.ID); err != nil {
			return err
		}
		_, err := tx.Exec(r.Context(), Q("BumpRoutes"))
		return err
	})
	if err != nil {
		return err
	}
	o.nudge()
	w.WriteHeader(204)
	return nil
}

var envNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

func (o *Operator) listEnv(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	rows, err := o.pool.Query(r.Context(), Q("EnvList"), p.ID)
	if err != nil {
		return err
	}
	type v struct {
		Name      string    `json:"name"`
		UpdatedAt time.Time `json:"updated_at"`
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (v, error) {
		var x v
		return x, row.Scan(&x.Name, &x.UpdatedAt)
	})
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, map[string]any{"env": out})
	return nil
}

func (o *Operator) setEnv(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	var req struct {
		Vars map[string]string `json:"vars"`
	}
	if err := decode(r, &req); err != nil {
		return err
	}
	if len(req.Vars) == 0 {
		return invalid("vars is empty")
	}
	var probs []string
	for k, v := range req.Vars {
		if !envNameRE.MatchString(k) {
			probs = append(probs, fmt.Sprintf("%q is not a valid variable name", k))
		}
		if len(v) > 64<<10 || strings.ContainsRune(v, 0) {
			probs = append(probs, fmt.Sprintf("value of %s is too long or contains NUL", k))
		}
	}
	if len(probs) > 0 {
		return invalid("%s", strings.Join(probs, "; "))
	}
	err = o.tx(r.Context(), func(tx pgx.Tx) error {
		for k, v := range req.Vars {
			nonce, ct := o.seal.Seal(p.ID.String(), k, v)
			if _, err := tx.Exec(r.Context(), Q("EnvUpsert"), p.ID, k, nonce, ct); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	names := make([]string, 0, len(req.Vars))
	for k := range req.Vars {
		names = append(names, k)
	}
	httpjson.Write(w, 200, map[string]any{"set": names, "note": "new values apply to the next deployment"})
	return nil
}

func (o *Operator) unsetEnv(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	tag, err := o.pool.Exec(r.Context(), Q("EnvDelete"), p.ID, r.PathValue("name"))
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return notFound("variable " + r.PathValue("name"))
	}
	w.WriteHeader(204)
	return nil
}

func (o *Operator) notify(ctx context.Context, channel string) {
	_, _ = o.pool.Exec(ctx, "SELECT pg_notify($1, '')", channel)
}

// idempotent replays a stored response for a repeated Idempotency-Key, or
// runs fn and stores its response.
func (o *Operator) idempotent(w http.ResponseWriter, r *http.Request, body []byte, fn func() (int, any, error)) error {
	key := r.Header.Get("Idempotency-Key")
	if key == "" {
		code, v, err := fn()
		if err != nil {
			return err
		}
		httpjson.Write(w, code, v)
		return nil
	}
	if len(key) > 200 {
		return invalid("Idempotency-Key is longer than 200 characters")
	}
	h := sha256.Sum256(append([]byte(r.URL.Path+"\x00"), body...))
	var prevHash []byte
	var prevCode int
	var prev json.RawMessage
	err := o.pool.QueryRow(r.Context(), Q("IdempotencyGet"), who(r).OrgID, key).Scan(&prevHash, &prevCode, &prev)
	if err == nil {
		if !bytes.Equal(prevHash, h[:]) {
			return fmt.Errorf("%w: Idempotency-Key %q was used for a different request", errConflict, key)
		}
		w.Header().Set("Idempotent-Replayed", "true")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(prevCode)
		_, _ = w.Write(prev)
		return nil
	}
	if !isNoRows(err) {
		return err
	}
	code, v, err := fn()
	if err != nil {
		return err
	}
	b, _ := json.Marshal(v)
	_, _ = o.pool.Exec(r.Context(), Q("IdempotencyPut"), who(r).OrgID, key, h[:], code, b)
	httpjson.Write(w, code, v)
	return nil
}

// Q is the named query from internal/store.
func Q(name string) string { return store.Q(name) }
