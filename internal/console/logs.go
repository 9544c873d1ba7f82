package console

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

// logLine is a line of a build or app log as the API streams it.
type logLine struct {
	Time   time.Time `json:"time"`
	Stream string    `json:"stream"`
	Line   string    `json:"line"`
	Region string    `json:"region"`
}

// logsView is the log page of one deployment.
type logsView struct {
	Project    string
	Deployment *apiclient.DeploymentDetail
	Name       string
	Kind       string // build, app
	Stream     string // the followed NDJSON
	Text       string // the plain-text log so far
	Other      string // the deployment's other log, if it has one
}

// logDeployment is the deployment of a log route, checked to belong to
// the project of the path (another organisation's, or another project's,
// is not found) and to have the log asked for.
func (c *Console) logDeployment(r *http.Request, s *session) (*apiclient.Project, *apiclient.DeploymentDetail, error) {
	notFound := &Error{Status: http.StatusNotFound, Code: "not_found", Message: "There is no such log."}
	kind := r.PathValue("kind")
	if kind != "build" && kind != "app" {
		return nil, nil, notFound
	}
	p, err := c.backend.Project(r.Context(), s.Principal, r.PathValue("project"))
	if err != nil {
		return nil, nil, err
	}
	d, err := c.backend.Deployment(r.Context(), s.Principal, r.PathValue("id"))
	if err != nil {
		return nil, nil, err
	}
	if d.ProjectID != p.ID || (kind == "build" && d.Build == nil) {
		return nil, nil, notFound
	}
	return p, d, nil
}

func (c *Console) logsPage(w http.ResponseWriter, r *http.Request, s *session) error {
	p, d, err := c.logDeployment(r, s)
	if err != nil {
		return err
	}
	kind := r.PathValue("kind")
	v := &logsView{Project: p.Name, Deployment: d, Name: hostLabel(d.Hostname), Kind: kind,
		Stream: projectPath(p.Name, "deployments", d.ID, "logs", kind, "stream"),
		Text:   projectPath(p.Name, "deployments", d.ID, "logs", kind, "text")}
	switch {
	case kind == "app" && d.Build != nil:
		v.Other = projectPath(p.Name, "deployments", d.ID, "logs", "build")
	case kind == "build":
		v.Other = projectPath(p.Name, "deployments", d.ID, "logs", "app")
	}
	title := "App log"
	if kind == "build" {
		title = "Build log"
	}
	c.render(w, r, http.StatusOK, "logs", &view{Title: title + " of " + v.Name, Nav: "projects", Session: s, Data: v})
	return nil
}

// flushWriter flushes each write: a followed log reaches the browser line
// by line.
type flushWriter struct{ w http.ResponseWriter }

func (f flushWriter) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if fl, ok := f.w.(http.Flusher); ok {
		fl.Flush()
	}
	return n, err
}

// logsStream follows a deployment's log as NDJSON, in-process from the
// API's handlers: the page's script reads it with fetch. The deployment is
// checked first, so the status and headers go out at once (a queued build
// has no lines yet, and the browser should not wait for headers).
func (c *Console) logsStream(w http.ResponseWriter, r *http.Request, s *session) error {
	_, d, err := c.logDeployment(r, s)
	if err != nil {
		return err
	}
	h := w.Header()
	h.Set("Content-Type", "application/x-ndjson")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if fl, ok := w.(http.Flusher); ok {
		fl.Flush()
	}
	if err := c.backend.Logs(r.Context(), s.Principal, d.ID, r.PathValue("kind"), true, flushWriter{w}); err != nil && r.Context().Err() == nil {
		// The status is sent: the stream's end is all the reader learns.
		c.log.Warn("console log stream failed", "deployment", d.ID, "kind", r.PathValue("kind"), "err", err)
	}
	return nil
}

// logsText is the log so far as plain text, one "time stream line" a
// line: the page's link for browsers without script.
func (c *Console) logsText(w http.ResponseWriter, r *http.Request, s *session) error {
	_, d, err := c.logDeployment(r, s)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := c.backend.Logs(r.Context(), s.Principal, d.ID, r.PathValue("kind"), false, &buf); err != nil {
		return err
	}
	var out strings.Builder
	sc := bufio.NewScanner(&buf)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l logLine
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			continue
		}
		stream := l.Stream
		if l.Region != "" {
			stream = l.Region + "/" + stream
		}
		fmt.Fprintf(&out, "%s %s %s\n", l.Time.UTC().Format("2006-01-02T15:04:05.000Z"), stream, l.Line)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Disposition", "inline")
	_, _ = w.Write([]byte(out.String()))
	return nil
}
