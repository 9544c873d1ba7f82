package operator

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/httpjson"
	"github.com/zeitwork/zeitwork/internal/operator/builds"
	"github.com/zeitwork/zeitwork/internal/operator/names"
	"github.com/zeitwork/zeitwork/internal/operator/webhook"
	"github.com/zeitwork/zeitwork/internal/store"
)

// Deployment is the API's deployment document.
type Deployment struct {
	ID            uuid.UUID                  `json:"id"`
	ProjectID     uuid.UUID                  `json:"project_id"`
	Project       string                     `json:"project"`
	Status        string                     `json:"status"`
	Hostname      string                     `json:"hostname"`
	URL           string                     `json:"url"`
	ProductionURL string                     `json:"production_url,omitempty"`
	Image         string                     `json:"image"`
	ImageDigest   string                     `json:"image_digest,omitempty"`
	CommitSHA     string                     `json:"commit_sha,omitempty"`
	CommitMessage string                     `json:"commit_message,omitempty"`
	Branch        string                     `json:"branch,omitempty"`
	Preview       bool                       `json:"preview"`
	Active        bool                       `json:"active"`
	FailureReason string                     `json:"failure_reason,omitempty"`
	CreatedAt     time.Time                  `json:"created_at"`
	BuildingAt    *time.Time                 `json:"building_at,omitempty"`
	PreparingAt   *time.Time                 `json:"preparing_at,omitempty"`
	StartingAt    *time.Time                 `json:"starting_at,omitempty"`
	HealthyAt     *time.Time                 `json:"healthy_at,omitempty"`
	ActiveAt      *time.Time                 `json:"active_at,omitempty"`
	FinishedAt    *time.Time                 `json:"finished_at,omitempty"`
	Regions       map[string]RegionInstances `json:"regions"`
	Instances     []Instance                 `json:"instances"`
	Build         *DeploymentBuild           `json:"build,omitempty"`
}

// DeploymentBuild is the build of a deployment built from source.
type DeploymentBuild struct {
	ID    uuid.UUID `json:"id"`
	State string    `json:"state"`
	Error string    `json:"error,omitempty"`
}

// RegionInstances summarises one region of a deployment.
type RegionInstances struct {
	Desired int `json:"desired"`
	Running int `json:"running"`
	Healthy int `json:"healthy"`
}

// Instance is the API's instance document.
type Instance struct {
	ID           uuid.UUID `json:"id"`
	DeploymentID uuid.UUID `json:"deployment_id,omitempty"`
	NodeID       uuid.UUID `json:"node_id"`
	Region       string    `json:"region"`
	State        string    `json:"state"`
	Healthy      bool      `json:"healthy"`
	Desired      string    `json:"desired_state"`
	Error        string    `json:"error,omitempty"`
	Restarts     int       `json:"restarts"`
	nodeAddress  string
	nodeState    string
}

func (o *Operator) deployment(ctx context.Context, org principal, id string) (*Deployment, error) {
	var d Deployment
	var buildID *uuid.UUID
	var buildState, buildError *string
	err := o.pool.QueryRow(ctx, Q("DeploymentGet"), org.OrgID, id).Scan(&d.ID, &d.ProjectID, &d.Project, &d.Status, &d.Hostname,
		&d.Image, &d.ImageDigest, &d.CommitSHA, &d.Branch, &d.Preview, &d.FailureReason, &d.CreatedAt, &d.PreparingAt,
		&d.StartingAt, &d.HealthyAt, &d.ActiveAt, &d.FinishedAt, &d.Active, &d.BuildingAt, &buildID, &buildState, &buildError,
		&d.CommitMessage)
	if isNoRows(err) {
		return nil, notFound("deployment " + id)
	}
	if err != nil {
		return nil, err
	}
	if buildID != nil {
		d.Build = &DeploymentBuild{ID: *buildID, State: *buildState, Error: *buildError}
	}
	d.URL = "https://" + d.Hostname
	if !d.Preview {
		d.ProductionURL = "https://" + names.AliasLabel(d.Project, org.OrgName) + "." + o.cfg.AppsDomain
	}
	d.Instances, err = o.instancesOf(ctx, d.ID)
	if err != nil {
		return nil, err
	}
	d.Regions = map[string]RegionInstances{}
	for _, in := range d.Instances {
		if in.Desired != "running" {
			continue
		}
		ri := d.Regions[in.Region]
		ri.Desired++
		if in.State == "running" {
			ri.Running++
		}
		if in.Healthy {
			ri.Healthy++
		}
		d.Regions[in.Region] = ri
	}
	return &d, nil
}

func (o *Operator) instancesOf(ctx context.Context, deploymentID uuid.UUID) ([]Instance, error) {
	rows, err := store.InstancesOf(ctx, o.pool, deploymentID)
	if err != nil {
		return nil, err
	}
	out := make([]Instance, 0, len(rows))
	for _, in := range rows {
		out = append(out, Instance{ID: in.ID, DeploymentID: in.DeploymentID, NodeID: in.NodeID, Region: in.Region, State: in.State,
			Healthy: in.Healthy, Desired: in.Desired, Error: in.Error, Restarts: in.Restarts, nodeAddress: in.NodeAddress, nodeState: in.NodeState})
	}
	return out, nil
}

type deployRequest struct {
	Image         string `json:"image"`
	CommitSHA     string `json:"commit_sha"`
	CommitMessage string `json:"commit_message"` // stored bounded (webhook.Message)
	Branch        string `json:"branch"`
	Preview       bool   `json:"preview"`
	SourceID      string `json:"source_id"` // an uploaded archive to build
}

func (o *Operator) createDeployment(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return invalid("cannot read body: %v", err)
	}
	r.Body = io.NopCloser(strings.NewReader(string(body)))
	var req deployRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	return o.idempotent(w, r, body, func() (int, any, error) {
		var id uuid.UUID
		err := o.tx(r.Context(), func(tx pgx.Tx) error {
			var err error
			id, err = o.newDeployment(r.Context(), tx, who(r), p, req, r.Header.Get("Idempotency-Key"))
			return err
		})
		if err != nil {
			return 0, nil, err
		}
		d, err := o.deployment(r.Context(), who(r), id.String())
		if err != nil {
			return 0, nil, err
		}
		return http.StatusAccepted, d, nil
	})
}

// newDeployment records a pending deployment and nudges the reconciler;
// a deployment built from source (a commit of a project without an image
// template, or an uploaded archive) gets its queued build in the same
// transaction (q must then be one). The same (project, commit), source
// archive or idempotency key returns the existing one.
func (o *Operator) newDeployment(ctx context.Context, q querier, org principal, p *Project, req deployRequest, idemKey string) (uuid.UUID, error) {
	req.Image = strings.TrimSpace(req.Image)
	req.CommitMessage = webhook.Message(req.CommitMessage)
	if req.CommitSHA != "" && !webhook.ValidSHA(req.CommitSHA) {
		return uuid.Nil, invalid("commit_sha %q is not a hex commit id", req.CommitSHA)
	}
	var b *newBuild
	switch {
	case req.SourceID != "":
		if req.Image != "" || req.CommitSHA != "" {
			return uuid.Nil, invalid("source_id cannot be combined with image or commit_sha")
		}
		srcID, err := uuid.Parse(req.SourceID)
		if err != nil {
			return uuid.Nil, notFound("source " + req.SourceID)
		}
		var existing uuid.UUID
		if err := q.QueryRow(ctx, Q("BuildBySource"), p.ID, srcID).Scan(&existing); err == nil {
			return existing, nil
		} else if !isNoRows(err) {
			return uuid.Nil, err
		}
		var sum string
		if err := q.QueryRow(ctx, Q("SourceOfProject"), srcID.String(), p.ID).Scan(&sum); isNoRows(err) {
			return uuid.Nil, notFound("source " + req.SourceID + " (sources belong to one project and are deleted when their build ends or after an hour unused)")
		} else if err != nil {
			return uuid.Nil, err
		}
		b = &newBuild{kind: "archive", sourceID: &srcID, sourceSHA: sum}
	case req.Image == "" && p.ImageTemplate == "" && p.buildsFromSource():
		if req.CommitSHA == "" {
			return uuid.Nil, invalid("commit_sha is required to build from source (or give image, or upload a source archive)")
		}
		if !builds.FullSHA(req.CommitSHA) {
			return uuid.Nil, invalid("commit_sha %q: a build from source needs the full 40-character commit id", req.CommitSHA)
		}
		b = &newBuild{kind: "git", gitURL: builds.RepoURL(o.cfg.GitBaseURL, p.GithubRepo, p.GitURL)}
	case req.Image == "":
		if req.CommitSHA == "" || p.ImageTemplate == "" {
			return uuid.Nil, invalid("image is required (or commit_sha with a project image_template or repository, or source_id)")
		}
		req.Image = strings.ReplaceAll(p.ImageTemplate, "{sha}", req.CommitSHA)
		req.Image = strings.ReplaceAll(req.Image, "{branch}", req.Branch)
	}
	if b != nil {
		req.Image = builds.TargetImage(o.cfg.BuildRegistry, org.OrgName, p.Name, builds.Tag(req.CommitSHA, b.sourceSHA))
	}
	if strings.ContainsAny(req.Image, " \t\n") || len(req.Image) > 512 {
		return uuid.Nil, invalid("image %q is not a valid reference", req.Image)
	}
	var key any
	if idemKey != "" {
		key = idemKey
	}
	// A fresh nanoid per attempt: a collision on the versioned hostname
	// (1 in 36^7) just draws again.
	for range 3 {
		id := newID()
		host := names.VersionedLabel(p.Name, names.NanoID(), org.OrgName) + "." + o.cfg.AppsDomain
		tag, err := q.Exec(ctx, Q("DeploymentInsert"), id, p.ID, org.OrgID, host, req.Image, req.CommitSHA, req.Branch, req.Preview, key,
			store.Interval(o.cfg.DeployTimeout), req.CommitMessage)
		if err != nil {
			return uuid.Nil, err
		}
		if tag.RowsAffected() == 1 {
			if b != nil {
				_, err := q.Exec(ctx, Q("BuildInsert"), newID(), id, p.ID, org.OrgID, req.Branch, b.kind, b.gitURL, req.CommitSHA,
					b.sourceID, b.sourceSHA, req.Image)
				if db.IsUniqueViolation(err) {
					return uuid.Nil, fmt.Errorf("%w: source %s is already being deployed", errConflict, req.SourceID)
				}
				if err != nil {
					return uuid.Nil, err
				}
			}
			o.m.deployments.WithLabelValues("pending").Inc()
			_, err := q.Exec(ctx, "SELECT pg_notify('zeitwork_reconcile', '')")
			return id, err
		}
		// An existing deployment for this key or commit wins.
		var existing uuid.UUID
		if idemKey != "" {
			err := q.QueryRow(ctx, Q("DeploymentByIdempotency"), p.ID, idemKey).Scan(&existing)
			if err == nil {
				return existing, nil
			} else if !isNoRows(err) {
				return uuid.Nil, err
			}
		}
		if req.CommitSHA != "" {
			err := q.QueryRow(ctx, Q("DeploymentBySHA"), p.ID, req.CommitSHA).Scan(&existing)
			if err == nil {
				return existing, nil
			} else if !isNoRows(err) {
				return uuid.Nil, err
			}
		}
	}
	return uuid.Nil, fmt.Errorf("cannot record the deployment: versioned hostname collisions")
}

// newBuild is the build a new deployment queues.
type newBuild struct {
	kind      string // git | archive
	gitURL    string
	sourceID  *uuid.UUID
	sourceSHA string
}

// listLimit is a list's ?limit= (1..500, default 50).
func listLimit(r *http.Request) int {
	if l, err := strconv.Atoi(r.URL.Query().Get("limit")); err == nil && l > 0 && l <= 500 {
		return l
	}
	return 50
}

// querier is what pgxpool.Pool and pgx.Tx have in common.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func (o *Operator) listDeployments(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	rows, err := o.pool.Query(r.Context(), Q("DeploymentsList"), p.ID, listLimit(r))
	if err != nil {
		return err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return err
	}
	out := []*Deployment{}
	for _, id := range ids {
		d, err := o.deployment(r.Context(), who(r), id.String())
		if err != nil {
			return err
		}
		out = append(out, d)
	}
	httpjson.Write(w, 200, map[string]any{"deployments": out})
	return nil
}

func (o *Operator) getDeployment(w http.ResponseWriter, r *http.Request) error {
	d, err := o.deployment(r.Context(), who(r), r.PathValue("id"))
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, d)
	return nil
}

func (o *Operator) stopDeployment(w http.ResponseWriter, r *http.Request) error {
	d, err := o.deployment(r.Context(), who(r), r.PathValue("id"))
	if err != nil {
		return err
	}
	if d.Active {
		return fmt.Errorf("%w: deployment %s serves production; promote or roll back to another one first", errConflict, d.ID)
	}
	type canceled struct {
		id     uuid.UUID
		source *uuid.UUID
		addr   string
	}
	var builds []canceled
	err = o.tx(r.Context(), func(tx pgx.Tx) error {
		if _, err := tx.Exec(r.Context(), Q("DeploymentSetStatus"), d.ID, "stopped", "stopped by request"); err != nil {
			return err
		}
		rows, err := tx.Query(r.Context(), Q("BuildCancelOfDeployment"), d.ID, "canceled: the deployment was stopped")
		if err != nil {
			return err
		}
		builds, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (canceled, error) {
			var c canceled
			return c, row.Scan(&c.id, &c.source, &c.addr)
		})
		if err != nil {
			return err
		}
		for _, c := range builds {
			if c.source != nil {
				if _, err := tx.Exec(r.Context(), Q("SourceDelete"), *c.source); err != nil {
					return err
				}
			}
		}
		if _, err := tx.Exec(r.Context(), Q("StopDeploymentInstances"), d.ID); err != nil {
			return err
		}
		_, err = tx.Exec(r.Context(), Q("BumpRoutes"))
		return err
	})
	if err != nil {
		return err
	}
	for _, c := range builds {
		o.m.build.Results.WithLabelValues(build.StateCanceled).Inc()
		if c.addr == "" {
			continue
		}
		// Best effort: the leader cancels it again while its node reports it.
		cctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		if err := o.agents.CancelBuild(cctx, c.addr, c.id.String()); err != nil {
			o.log.Warn("cannot cancel build on node", "build_id", c.id, "node", c.addr, "err", err)
		}
		cancel()
	}
	o.nudge()
	d, err = o.deployment(r.Context(), who(r), d.ID.String())
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, d)
	return nil
}

func (o *Operator) promoteDeployment(w http.ResponseWriter, r *http.Request) error {
	d, err := o.deployment(r.Context(), who(r), r.PathValue("id"))
	if err != nil {
		return err
	}
	if err := o.switchTo(r.Context(), d); err != nil {
		return err
	}
	d, err = o.deployment(r.Context(), who(r), d.ID.String())
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, d)
	return nil
}

func (o *Operator) rollback(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	var req struct {
		DeploymentID string `json:"deployment_id"`
	}
	if r.ContentLength != 0 {
		if err := decode(r, &req); err != nil {
			return err
		}
	}
	target := req.DeploymentID
	if target == "" {
		var id uuid.UUID
		err := o.pool.QueryRow(r.Context(), Q("PreviousHealthy"), p.ID, p.ActiveDeploymentID).Scan(&id)
		if isNoRows(err) {
			return fmt.Errorf("%w: no earlier healthy deployment to roll back to", errConflict)
		}
		if err != nil {
			return err
		}
		target = id.String()
	}
	d, err := o.deployment(r.Context(), who(r), target)
	if err != nil {
		return err
	}
	if d.ProjectID != p.ID {
		return notFound("deployment " + target)
	}
	if err := o.switchTo(r.Context(), d); err != nil {
		return err
	}
	d, err = o.deployment(r.Context(), who(r), d.ID.String())
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, d)
	return nil
}

// switchTo moves the project's production alias (and its custom domains)
// to d now when d's instances are healthy; otherwise it restarts them and
// the reconciler promotes d once they are.
func (o *Operator) switchTo(ctx context.Context, d *Deployment) error {
	if d.Preview {
		return fmt.Errorf("%w: preview deployments are not promoted", errConflict)
	}
	switch d.Status {
	case "failed", "stopped":
		return fmt.Errorf("%w: deployment %s is %s", errConflict, d.ID, d.Status)
	}
	if d.Build != nil && !build.Terminal(d.Build.State) {
		return fmt.Errorf("%w: deployment %s is still building; it goes live on its own once built and healthy", errConflict, d.ID)
	}
	healthy, running := 0, 0
	for _, in := range d.Instances {
		if in.Desired == "running" {
			running++
			if in.Healthy {
				healthy++
			}
		}
	}
	if healthy > 0 && healthy == running && d.HealthyAt != nil {
		return o.promote(ctx, d.ProjectID, d.ID)
	}
	// Its VMs are gone: start them again; promotion follows health.
	err := o.tx(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, Q("DeploymentRestart"), d.ID, store.Interval(o.cfg.DeployTimeout))
		return err
	})
	if err != nil {
		return err
	}
	o.notify(ctx, "zeitwork_reconcile")
	return nil
}

// promote points the project's alias at deploymentID and supersedes the
// previous active deployment, in one transaction, and tells edges.
func (o *Operator) promote(ctx context.Context, projectID, deploymentID uuid.UUID) error {
	if err := store.Promote(ctx, o.pool, projectID, deploymentID); err != nil {
		return err
	}
	o.m.deployments.WithLabelValues("active").Inc()
	o.log.Info("promoted", "project_id", projectID, "deployment_id", deploymentID)
	return nil
}

func (o *Operator) listInstances(w http.ResponseWriter, r *http.Request) error {
	rows, err := o.pool.Query(r.Context(), Q("InstancesList"), who(r).OrgID, r.URL.Query().Get("deployment"))
	if err != nil {
		return err
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Instance, error) {
		var in Instance
		return in, row.Scan(&in.ID, &in.DeploymentID, &in.NodeID, &in.Region, &in.State, &in.Healthy, &in.Desired, &in.Error, &in.Restarts)
	})
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, map[string]any{"instances": out})
	return nil
}

// deploymentLogs merges the logs of a deployment's instances from their
// node agents as NDJSON, following when asked.
func (o *Operator) deploymentLogs(w http.ResponseWriter, r *http.Request) error {
	d, err := o.deployment(r.Context(), who(r), r.PathValue("id"))
	if err != nil {
		return err
	}
	follow := r.URL.Query().Get("follow") == "1" || r.URL.Query().Get("follow") == "true"
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(200)
	var mu sync.Mutex
	fl, _ := w.(http.Flusher)
	var wg sync.WaitGroup
	ctx, cancel := o.untilDrained(r.Context()) // a shutdown ends a follow
	defer cancel()
	for _, in := range d.Instances {
		if in.nodeState == "down" {
			continue
		}
		wg.Go(func() {
			body, err := o.agents.Logs(ctx, in.nodeAddress, in.ID.String(), follow)
			if err != nil {
				return
			}
			defer body.Close()
			sc := bufio.NewScanner(body)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				var line map[string]any
				if json.Unmarshal(sc.Bytes(), &line) != nil {
					continue
				}
				line["instance_id"] = in.ID
				line["region"] = in.Region
				b, _ := json.Marshal(line)
				mu.Lock()
				_, _ = w.Write(append(b, '\n'))
				if fl != nil {
					fl.Flush()
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return nil
}
