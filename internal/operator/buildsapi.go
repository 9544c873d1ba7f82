package operator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/httpjson"
	"github.com/zeitwork/zeitwork/internal/operator/builds"
)

// Build is the API's build document.
type Build struct {
	ID             uuid.UUID  `json:"id"`
	DeploymentID   uuid.UUID  `json:"deployment_id"`
	ProjectID      uuid.UUID  `json:"project_id"`
	Project        string     `json:"project"`
	Branch         string     `json:"branch"`
	State          string     `json:"state"`
	NodeID         *uuid.UUID `json:"node_id"`
	SourceKind     string     `json:"source_kind"` // git | archive
	CommitSHA      string     `json:"commit_sha,omitempty"`
	SourceSHA256   string     `json:"source_sha256,omitempty"`
	Image          string     `json:"image"`                      // target tag
	ImageDigestRef string     `json:"image_digest_ref,omitempty"` // what was pushed
	Error          string     `json:"error,omitempty"`
	CacheHits      int        `json:"cache_hits"`
	Steps          int        `json:"steps"`
	LogTruncated   bool       `json:"log_truncated"`
	CreatedAt      time.Time  `json:"created_at"`
	StartedAt      *time.Time `json:"started_at,omitempty"`
	FinishedAt     *time.Time `json:"finished_at,omitempty"`
	DeadlineAt     *time.Time `json:"deadline_at,omitempty"`
}

func scanBuild(row pgx.Row, b *Build) error {
	return row.Scan(&b.ID, &b.DeploymentID, &b.ProjectID, &b.Project, &b.Branch, &b.State, &b.NodeID, &b.SourceKind,
		&b.CommitSHA, &b.SourceSHA256, &b.Image, &b.ImageDigestRef, &b.Error, &b.CacheHits, &b.Steps, &b.LogTruncated,
		&b.CreatedAt, &b.StartedAt, &b.FinishedAt, &b.DeadlineAt)
}

func (o *Operator) build(ctx context.Context, org principal, id string) (*Build, error) {
	var b Build
	err := scanBuild(o.pool.QueryRow(ctx, Q("BuildGet"), org.OrgID, id), &b)
	if isNoRows(err) {
		return nil, notFound("build " + id)
	}
	if err != nil {
		return nil, err
	}
	return &b, nil
}

func (o *Operator) getBuild(w http.ResponseWriter, r *http.Request) error {
	b, err := o.build(r.Context(), who(r), r.PathValue("id"))
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, b)
	return nil
}

func (o *Operator) listBuilds(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	rows, err := o.pool.Query(r.Context(), Q("BuildsOfProject"), p.ID, listLimit(r))
	if err != nil {
		return err
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Build, error) {
		var b Build
		return b, scanBuild(row, &b)
	})
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, map[string]any{"builds": out})
	return nil
}

// maxPendingSources bounds the archives a project keeps in PostgreSQL
// (uploaded and not yet built, or building).
const maxPendingSources = 20

// uploadSource stores a gzipped tar of a source tree for a later
// POST /deployments {"source_id"}.
func (o *Operator) uploadSource(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || (mt != "application/gzip" && mt != "application/x-gzip") {
		return invalid("Content-Type must be application/gzip: upload a gzipped tar of the source tree (got %q)", r.Header.Get("Content-Type"))
	}
	var pending int
	if err := o.pool.QueryRow(r.Context(), Q("SourcesOfProjectCount"), p.ID).Scan(&pending); err != nil {
		return err
	}
	if pending >= maxPendingSources {
		return fmt.Errorf("%w: project %s has %d source archives waiting for their builds; deploy them or wait for their builds to end",
			errConflict, p.Name, pending)
	}
	// Each upload is held in memory while it is checked: a few at a time.
	select {
	case o.uploads <- struct{}{}:
		defer func() { <-o.uploads }()
	case <-r.Context().Done():
		return r.Context().Err()
	}
	limit := o.cfg.MaxSourceBytes
	tooLarge := fmt.Errorf("%w: the source archive is larger than %d MiB; leave out build outputs and dependencies (node_modules, target/, …)",
		errTooLarge, limit>>20)
	if r.ContentLength > limit {
		return tooLarge
	}
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return tooLarge
	}
	if err != nil {
		return invalid("cannot read the upload: %v", err)
	}
	if len(data) == 0 {
		return invalid("the body is empty; upload a gzipped tar of the source tree")
	}
	if err := builds.CheckArchive(data); errors.Is(err, builds.ErrTooLarge) {
		return fmt.Errorf("%w: %v", errTooLarge, err)
	} else if err != nil {
		return invalid("%v", err)
	}
	sum := sha256.Sum256(data)
	id := newID()
	if _, err := o.pool.Exec(r.Context(), Q("SourceInsert"), id, who(r).OrgID, p.ID, data, len(data), hex.EncodeToString(sum[:])); err != nil {
		return err
	}
	httpjson.Write(w, 201, map[string]any{"source_id": id, "sha256": hex.EncodeToString(sum[:]), "size": len(data)})
	return nil
}

// downloadSource streams an uploaded archive to a node agent, in chunks
// so the operator never holds it whole.
func (o *Operator) downloadSource(w http.ResponseWriter, r *http.Request) error {
	var size int64
	var sum string
	err := o.pool.QueryRow(r.Context(), Q("SourceInfo"), r.PathValue("id")).Scan(&size, &sum)
	if isNoRows(err) {
		return notFound("source " + r.PathValue("id"))
	}
	if err != nil {
		return err
	}
	id := uuid.MustParse(r.PathValue("id")) // it matched a row by its text form
	w.Header().Set("Content-Type", "application/gzip")
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.Header().Set("X-Zeitwork-Source-SHA256", sum)
	w.WriteHeader(200)
	const chunk = 4 << 20
	for off := int64(0); off < size; off += chunk {
		var b []byte
		if err := o.pool.QueryRow(r.Context(), Q("SourceChunk"), id, off+1, chunk).Scan(&b); err != nil {
			o.log.Warn("cannot stream source", "source_id", id, "err", err)
			return nil // the short body tells the agent
		}
		if _, err := w.Write(b); err != nil {
			return nil
		}
	}
	return nil
}

// buildLogs serves a build's log as NDJSON (build.LogLine). While the build
// runs its node streams it (followed with ?follow=1); once it has ended it
// comes from PostgreSQL. A follow ends when the build does.
func (o *Operator) buildLogs(w http.ResponseWriter, r *http.Request) error {
	b, err := o.build(r.Context(), who(r), r.PathValue("id"))
	if err != nil {
		return err
	}
	ctx, cancel := o.untilDrained(r.Context()) // a shutdown ends a follow
	defer cancel()
	follow := r.URL.Query().Get("follow") == "1" || r.URL.Query().Get("follow") == "true"
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(200)
	fl, _ := w.(http.Flusher)
	last := -1 // seq of the last line sent
	emit := func(l build.LogLine) error {
		if l.Seq <= last {
			return nil
		}
		last = l.Seq
		line, _ := json.Marshal(l)
		if _, err := w.Write(append(line, '\n')); err != nil {
			return err
		}
		if fl != nil {
			fl.Flush()
		}
		return nil
	}
	for ctx.Err() == nil {
		var state, addr, nodeState string
		if err := o.pool.QueryRow(ctx, Q("BuildWhere"), b.ID).Scan(&state, &addr, &nodeState); err != nil {
			return nil
		}
		if build.Terminal(state) {
			rows, err := o.pool.Query(ctx, Q("BuildLogLines"), b.ID, last)
			if err != nil {
				return nil
			}
			var l build.LogLine
			_, _ = pgx.ForEachRow(rows, []any{&l.Seq, &l.Time, &l.Stream, &l.Line}, func() error { return emit(l) })
			return nil
		}
		if state == build.StateRunning && addr != "" && nodeState != "down" {
			body, err := o.agents.BuildLogs(ctx, addr, b.ID.String(), follow, last)
			if err == nil {
				_ = builds.ScanLog(body, emit)
				body.Close()
			}
		}
		if !follow {
			return nil
		}
		// Queued, or the node's stream ended: look again shortly (the
		// build's end reaches PostgreSQL within a pass).
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
	return nil
}
