package apiclient

import (
	"context"
	"io"
	"net/url"
	"time"
)

// Project is the operator's project document.
type Project struct {
	ID                    string    `json:"id"`
	Name                  string    `json:"name"`
	GithubRepo            string    `json:"github_repo"`
	GithubBranch          string    `json:"github_branch"`
	ImageTemplate         string    `json:"image_template"`
	Port                  int       `json:"port"`
	HealthPath            string    `json:"health_path"`
	MinInstancesPerRegion int       `json:"min_instances_per_region"`
	VCPUs                 int       `json:"vcpus"`
	MemoryMiB             int       `json:"memory_mib"`
	ActiveDeploymentID    *string   `json:"active_deployment_id"`
	ProductionURL         string    `json:"production_url"`
	CreatedAt             time.Time `json:"created_at"`
	GitURL                string    `json:"git_url"`
	Dockerfile            string    `json:"dockerfile"`
	BuildContext          string    `json:"build_context"`
	GitTokenSet           bool      `json:"git_token_set"`
	BuildsFromSource      bool      `json:"builds_from_source"`
}

// ProjectSpec creates or changes a project; nil fields keep their value
// (or the default on create).
type ProjectSpec struct {
	Name                  *string `json:"name,omitempty"`
	GithubRepo            *string `json:"github_repo,omitempty"`
	GithubBranch          *string `json:"github_branch,omitempty"`
	ImageTemplate         *string `json:"image_template,omitempty"`
	Port                  *int    `json:"port,omitempty"`
	HealthPath            *string `json:"health_path,omitempty"`
	MinInstancesPerRegion *int    `json:"min_instances_per_region,omitempty"`
	VCPUs                 *int    `json:"vcpus,omitempty"`
	MemoryMiB             *int    `json:"memory_mib,omitempty"`
	GitURL                *string `json:"git_url,omitempty"`
	Dockerfile            *string `json:"dockerfile,omitempty"`
	BuildContext          *string `json:"build_context,omitempty"`
	GitToken              *string `json:"git_token,omitempty"` // write-only; "" clears it
}

// DeployRequest starts a deployment: an image reference; or a commit SHA
// the project's image template turns into one, or that is built from the
// project's repository when it has no template; or an uploaded source
// archive (SourceID) to build.
type DeployRequest struct {
	Image         string `json:"image,omitempty"`
	CommitSHA     string `json:"commit_sha,omitempty"`
	CommitMessage string `json:"commit_message,omitempty"`
	Branch        string `json:"branch,omitempty"`
	Preview       bool   `json:"preview,omitempty"`
	SourceID      string `json:"source_id,omitempty"`
}

// Source is an uploaded source archive.
type Source struct {
	SourceID string `json:"source_id"`
	SHA256   string `json:"sha256"`
	Size     int64  `json:"size"`
}

// Build is a build from source.
type Build struct {
	ID             string     `json:"id"`
	DeploymentID   string     `json:"deployment_id"`
	ProjectID      string     `json:"project_id"`
	Project        string     `json:"project"`
	Branch         string     `json:"branch"`
	State          string     `json:"state"`
	NodeID         *string    `json:"node_id"`
	SourceKind     string     `json:"source_kind"`
	CommitSHA      string     `json:"commit_sha"`
	SourceSHA256   string     `json:"source_sha256"`
	Image          string     `json:"image"`
	ImageDigestRef string     `json:"image_digest_ref"`
	Error          string     `json:"error"`
	CacheHits      int        `json:"cache_hits"`
	Steps          int        `json:"steps"`
	LogTruncated   bool       `json:"log_truncated"`
	CreatedAt      time.Time  `json:"created_at"`
	StartedAt      *time.Time `json:"started_at"`
	FinishedAt     *time.Time `json:"finished_at"`
	DeadlineAt     *time.Time `json:"deadline_at"`
}

// BuildLogLine is one line of a build log (NDJSON).
type BuildLogLine struct {
	Seq    int       `json:"seq"`
	Time   time.Time `json:"time"`
	Stream string    `json:"stream"` // "build" (the builder) or "zeitwork" (the platform)
	Line   string    `json:"line"`
}

// Instance is one VM of a deployment.
type Instance struct {
	ID           string `json:"id"`
	DeploymentID string `json:"deployment_id"`
	NodeID       string `json:"node_id"`
	Region       string `json:"region"`
	State        string `json:"state"`
	Healthy      bool   `json:"healthy"`
	DesiredState string `json:"desired_state"`
	Error        string `json:"error"`
	Restarts     int    `json:"restarts"`
}

// DeploymentDetail is the full deployment document, instances included.
type DeploymentDetail struct {
	Deployment
	ProjectID   string     `json:"project_id"`
	Hostname    string     `json:"hostname"`
	ImageDigest string     `json:"image_digest"`
	Branch      string     `json:"branch"`
	Instances   []Instance `json:"instances"`
}

// EnvVar is a variable's name; values are never returned.
type EnvVar struct {
	Name      string    `json:"name"`
	UpdatedAt time.Time `json:"updated_at"`
}

// DNSRecord is a record to create for a custom domain.
type DNSRecord struct {
	Type  string `json:"type"`
	Name  string `json:"name"`
	Value string `json:"value"`
	Note  string `json:"note"`
}

// Domain is a custom domain of a project.
type Domain struct {
	ID            string             `json:"id"`
	ProjectID     string             `json:"project_id"`
	Name          string             `json:"name"`
	Verified      bool               `json:"verified"`
	VerifiedAt    *time.Time         `json:"verified_at"`
	LastCheckedAt *time.Time         `json:"last_checked_at"`
	LastError     string             `json:"last_error"`
	CreatedAt     time.Time          `json:"created_at"`
	DNSRecords    []DNSRecord        `json:"dns_records"`
	Certificate   *DomainCertificate `json:"certificate"`
}

// DomainCertificate is the state of a domain's TLS certificate in the
// edges' storage: none, issued or expired.
type DomainCertificate struct {
	State    string     `json:"state"`
	NotAfter *time.Time `json:"not_after"`
	Issuer   string     `json:"issuer"`
}

// Node is a worker node.
type Node struct {
	ID              string    `json:"id"`
	Region          string    `json:"region"`
	Hostname        string    `json:"hostname"`
	Address         string    `json:"address"`
	State           string    `json:"state"`
	VCPUs           int       `json:"vcpus"`
	MemoryMiB       int       `json:"memory_mib"`
	LastHeartbeatAt time.Time `json:"last_heartbeat_at"`
	Instances       int       `json:"instances"`
	MaxBuilds       int       `json:"max_builds"` // build slots
	Builds          int       `json:"builds"`     // running builds
}

// Region summarises a region's nodes.
type Region struct {
	Name       string `json:"name"`
	ReadyNodes int    `json:"ready_nodes"`
	Nodes      int    `json:"nodes"`
}

// Identity is who a token is.
type Identity struct {
	Organisation   string `json:"organisation"`
	OrganisationID string `json:"organisation_id"`
	TokenID        string `json:"token_id"`
}

// NewToken is a freshly created token; Token is shown only now.
type NewToken struct {
	ID    string `json:"id"`
	Name  string `json:"name"`
	Token string `json:"token"`
}

func p(parts ...string) string {
	out := "/api/v1"
	for _, s := range parts {
		out += "/" + url.PathEscape(s)
	}
	return out
}

// Whoami answers which organisation the token belongs to.
func (c *Client) Whoami(ctx context.Context) (*Identity, error) {
	var out Identity
	return &out, c.Do(ctx, "GET", p("whoami"), nil, &out)
}

// CreateToken mints another token of the organisation.
func (c *Client) CreateToken(ctx context.Context, name string) (*NewToken, error) {
	var out NewToken
	return &out, c.Do(ctx, "POST", p("tokens"), map[string]string{"name": name}, &out)
}

// RevokeToken deletes a token.
func (c *Client) RevokeToken(ctx context.Context, id string) error {
	return c.Do(ctx, "DELETE", p("tokens", id), nil, nil)
}

// Projects lists the organisation's projects.
func (c *Client) Projects(ctx context.Context) ([]Project, error) {
	var out struct {
		Projects []Project `json:"projects"`
	}
	return out.Projects, c.Do(ctx, "GET", p("projects"), nil, &out)
}

// Project reads one project by id or name.
func (c *Client) Project(ctx context.Context, project string) (*Project, error) {
	var out Project
	return &out, c.Do(ctx, "GET", p("projects", project), nil, &out)
}

// CreateProject creates a project; spec.Name is required.
func (c *Client) CreateProject(ctx context.Context, spec ProjectSpec) (*Project, error) {
	var out Project
	return &out, c.Do(ctx, "POST", p("projects"), spec, &out)
}

// UpdateProject changes the fields set in spec.
func (c *Client) UpdateProject(ctx context.Context, project string, spec ProjectSpec) (*Project, error) {
	var out Project
	return &out, c.Do(ctx, "PATCH", p("projects", project), spec, &out)
}

// DeleteProject deletes a project and stops its deployments.
func (c *Client) DeleteProject(ctx context.Context, project string) error {
	return c.Do(ctx, "DELETE", p("projects", project), nil, nil)
}

// SetEnv sets variables (write-only).
func (c *Client) SetEnv(ctx context.Context, project string, vars map[string]string) error {
	return c.Do(ctx, "PUT", p("projects", project, "env"), map[string]any{"vars": vars}, nil)
}

// Env lists variable names.
func (c *Client) Env(ctx context.Context, project string) ([]EnvVar, error) {
	var out struct {
		Env []EnvVar `json:"env"`
	}
	return out.Env, c.Do(ctx, "GET", p("projects", project, "env"), nil, &out)
}

// UnsetEnv removes a variable.
func (c *Client) UnsetEnv(ctx context.Context, project, name string) error {
	return c.Do(ctx, "DELETE", p("projects", project, "env", name), nil, nil)
}

// Deploy starts a deployment; a non-empty idempotencyKey makes retries safe.
func (c *Client) Deploy(ctx context.Context, project string, req DeployRequest, idempotencyKey string) (*DeploymentDetail, error) {
	var out DeploymentDetail
	var hdr []string
	if idempotencyKey != "" {
		hdr = []string{"Idempotency-Key", idempotencyKey}
	}
	return &out, c.Do(ctx, "POST", p("projects", project, "deployments"), req, &out, hdr...)
}

// Deployments lists a project's deployments, newest first.
func (c *Client) Deployments(ctx context.Context, project string) ([]DeploymentDetail, error) {
	var out struct {
		Deployments []DeploymentDetail `json:"deployments"`
	}
	return out.Deployments, c.Do(ctx, "GET", p("projects", project, "deployments"), nil, &out)
}

// Deployment reads one deployment.
func (c *Client) Deployment(ctx context.Context, id string) (*DeploymentDetail, error) {
	var out DeploymentDetail
	return &out, c.Do(ctx, "GET", p("deployments", id), nil, &out)
}

// StopDeployment stops a deployment that does not serve production.
func (c *Client) StopDeployment(ctx context.Context, id string) (*DeploymentDetail, error) {
	var out DeploymentDetail
	return &out, c.Do(ctx, "POST", p("deployments", id, "stop"), nil, &out)
}

// Promote points the production alias at a deployment.
func (c *Client) Promote(ctx context.Context, id string) (*DeploymentDetail, error) {
	var out DeploymentDetail
	return &out, c.Do(ctx, "POST", p("deployments", id, "promote"), nil, &out)
}

// Rollback moves the alias back to deploymentID, or to the previous
// healthy deployment when it is empty.
func (c *Client) Rollback(ctx context.Context, project, deploymentID string) (*DeploymentDetail, error) {
	var out DeploymentDetail
	var body any
	if deploymentID != "" {
		body = map[string]string{"deployment_id": deploymentID}
	}
	return &out, c.Do(ctx, "POST", p("projects", project, "rollback"), body, &out)
}

// Logs streams a deployment's logs as NDJSON (follow keeps it open).
func (c *Client) Logs(ctx context.Context, deploymentID string, follow bool) (io.ReadCloser, error) {
	q := "?follow=0"
	if follow {
		q = "?follow=1"
	}
	return c.Stream(ctx, p("deployments", deploymentID, "logs")+q)
}

// UploadSource uploads a gzipped tar of a source tree for a later
// Deploy with SourceID.
func (c *Client) UploadSource(ctx context.Context, project string, targz io.Reader) (*Source, error) {
	var out Source
	return &out, c.Upload(ctx, "POST", p("projects", project, "sources"), "application/gzip", targz, &out)
}

// Builds lists a project's builds, newest first.
func (c *Client) Builds(ctx context.Context, project string) ([]Build, error) {
	var out struct {
		Builds []Build `json:"builds"`
	}
	return out.Builds, c.Do(ctx, "GET", p("projects", project, "builds"), nil, &out)
}

// Build reads one build.
func (c *Client) Build(ctx context.Context, id string) (*Build, error) {
	var out Build
	return &out, c.Do(ctx, "GET", p("builds", id), nil, &out)
}

// BuildLogs streams a build's log as NDJSON (BuildLogLine); follow keeps
// it open until the build ends.
func (c *Client) BuildLogs(ctx context.Context, id string, follow bool) (io.ReadCloser, error) {
	q := "?follow=0"
	if follow {
		q = "?follow=1"
	}
	return c.Stream(ctx, p("builds", id, "logs")+q)
}

// Instances lists a deployment's instances.
func (c *Client) Instances(ctx context.Context, deploymentID string) ([]Instance, error) {
	var out struct {
		Instances []Instance `json:"instances"`
	}
	return out.Instances, c.Do(ctx, "GET", p("instances")+"?deployment="+url.QueryEscape(deploymentID), nil, &out)
}

// AddDomain adds a custom domain; the answer lists the DNS records to create.
func (c *Client) AddDomain(ctx context.Context, project, name string) (*Domain, error) {
	var out Domain
	return &out, c.Do(ctx, "POST", p("projects", project, "domains"), map[string]string{"name": name}, &out)
}

// Domains lists a project's domains.
func (c *Client) Domains(ctx context.Context, project string) ([]Domain, error) {
	var out struct {
		Domains []Domain `json:"domains"`
	}
	return out.Domains, c.Do(ctx, "GET", p("projects", project, "domains"), nil, &out)
}

// VerifyDomain checks DNS now; the domain's Verified and LastError tell
// the outcome.
func (c *Client) VerifyDomain(ctx context.Context, domain string) (*Domain, error) {
	var out Domain
	return &out, c.Do(ctx, "POST", p("domains", domain, "verify"), nil, &out)
}

// RemoveDomain removes a custom domain.
func (c *Client) RemoveDomain(ctx context.Context, domain string) error {
	return c.Do(ctx, "DELETE", p("domains", domain), nil, nil)
}

// Nodes lists worker nodes.
func (c *Client) Nodes(ctx context.Context) ([]Node, error) {
	var out struct {
		Nodes []Node `json:"nodes"`
	}
	return out.Nodes, c.Do(ctx, "GET", p("nodes"), nil, &out)
}

// Regions lists regions.
func (c *Client) Regions(ctx context.Context) ([]Region, error) {
	var out struct {
		Regions []Region `json:"regions"`
	}
	return out.Regions, c.Do(ctx, "GET", p("regions"), nil, &out)
}

// DrainNode stops placing on a node and moves its instances away (admin).
func (c *Client) DrainNode(ctx context.Context, id string) error {
	return c.Do(ctx, "POST", p("nodes", id, "drain"), nil, nil)
}

// EnableNode makes a drained node eligible again (admin).
func (c *Client) EnableNode(ctx context.Context, id string) error {
	return c.Do(ctx, "POST", p("nodes", id, "enable"), nil, nil)
}
