package console

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

// deploymentsShown is how many deployments the project page lists (and
// polls: each costs the API's queries of one deployment document).
const deploymentsShown = 10

// projectRow is a line of the projects list.
type projectRow struct {
	apiclient.Project
	Live       *apiclient.DeploymentDetail // the active deployment
	Latest     *apiclient.DeploymentDetail // the newest one while it is on its way, or when it failed
	LastDeploy *time.Time                  // when the newest deployment started
}

func (c *Console) projectsPage(w http.ResponseWriter, r *http.Request, s *session) error {
	return c.showProjects(w, r, s, http.StatusOK, "", nil)
}

func (c *Console) showProjects(w http.ResponseWriter, r *http.Request, s *session, status int, problem string, form map[string]string) error {
	ps, err := c.backend.Projects(r.Context(), s.Principal)
	if err != nil {
		return err
	}
	rows := make([]projectRow, 0, len(ps))
	for _, p := range ps {
		row := projectRow{Project: p}
		ds, err := c.backend.Deployments(r.Context(), s.Principal, p.ID, 1)
		if err != nil {
			return err
		}
		if len(ds) > 0 {
			row.Latest, row.LastDeploy = &ds[0], &ds[0].CreatedAt
		}
		switch {
		case row.Latest != nil && row.Latest.Active:
			row.Live, row.Latest = row.Latest, nil
		case row.Latest != nil && !inProgress(row.Latest.Status) && row.Latest.Status != "failed":
			row.Latest = nil // stopped or superseded: production tells the story
		}
		if row.Live == nil && p.ActiveDeploymentID != nil {
			d, err := c.backend.Deployment(r.Context(), s.Principal, *p.ActiveDeploymentID)
			switch {
			case err == nil:
				row.Live = d
			case !isNotFound(err):
				return err
			}
		}
		rows = append(rows, row)
	}
	if form == nil {
		form = map[string]string{"port": "8080", "health_path": "/", "min_instances": "3"}
	}
	c.render(w, r, status, "projects", &view{Title: "Projects", Nav: "projects", Session: s, Flash: c.takeFlash(w, r), Error: problem,
		Data: map[string]any{"Projects": rows, "Form": form}})
	return nil
}

func (c *Console) createProject(w http.ResponseWriter, r *http.Request, s *session) error {
	f := r.PostForm
	form := map[string]string{}
	for _, k := range []string{"name", "github_repo", "image_template", "port", "health_path", "min_instances"} {
		form[k] = strings.TrimSpace(f.Get(k))
	}
	var spec apiclient.ProjectSpec
	var probs []string
	str := func(k string) *string {
		if form[k] == "" {
			return nil
		}
		v := form[k]
		return &v
	}
	num := func(k, label string) *int {
		if form[k] == "" {
			return nil
		}
		n, err := strconv.Atoi(form[k])
		if err != nil {
			probs = append(probs, label+" must be a whole number")
			return nil
		}
		return &n
	}
	name := form["name"]
	spec.Name = &name
	spec.GithubRepo, spec.ImageTemplate, spec.HealthPath = str("github_repo"), str("image_template"), str("health_path")
	spec.Port, spec.MinInstancesPerRegion = num("port", "Port"), num("min_instances", "Instances per region")
	if len(probs) > 0 {
		return c.showProjects(w, r, s, http.StatusBadRequest, strings.Join(probs, "; "), form)
	}
	p, err := c.backend.CreateProject(r.Context(), s.Principal, spec)
	if e := userError(err); e != nil {
		return c.showProjects(w, r, s, e.Status, e.Message, form)
	}
	if err != nil {
		return err
	}
	c.flash(w, r, "Created project "+p.Name+". Deploy an image to bring it up.")
	http.Redirect(w, r, projectPath(p.Name), http.StatusSeeOther)
	return nil
}

// userError is err when it is a 4xx the user can act on.
func userError(err error) *Error {
	var e *Error
	if errors.As(err, &e) && e.Status >= 400 && e.Status < 500 {
		return e
	}
	return nil
}

func isNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == http.StatusNotFound
}

// deploymentView is one deployment on the project page.
type deploymentView struct {
	apiclient.DeploymentDetail
	Name       string // the versioned host's first label
	Phases     []phase
	Regions    []regionView
	Instances  []instanceView // by region, then node
	InProgress bool
	Promote    bool // newer than production and healthy: may go live
	RollBack   bool // older than production and was healthy: may go back
	Stop       bool
}

// LiveSince is when the deployment took production traffic.
func (d deploymentView) LiveSince() time.Time {
	if d.ActiveAt != nil {
		return *d.ActiveAt
	}
	return d.CreatedAt
}

type phase struct {
	Name string
	At   time.Time
}

func inProgress(status string) bool {
	switch status {
	case "pending", "building", "preparing", "starting", "healthy":
		return true
	}
	return false
}

// phases lists when a deployment reached each phase, in time order. The
// end (finished_at) is named after how it ended, and left out while the
// deployment runs again (rolled back to after it was superseded).
func phases(d apiclient.Deployment) []phase {
	out := []phase{{"created", d.CreatedAt}}
	for _, p := range []struct {
		name string
		at   *time.Time
	}{{"building", d.BuildingAt}, {"preparing", d.PreparingAt}, {"starting", d.StartingAt}, {"healthy", d.HealthyAt}, {"active", d.ActiveAt}} {
		if p.at != nil {
			out = append(out, phase{p.name, *p.at})
		}
	}
	if d.FinishedAt != nil && (d.Status == "failed" || d.Status == "stopped" || d.Status == "superseded") {
		out = append(out, phase{d.Status, *d.FinishedAt})
	}
	slices.SortStableFunc(out, func(a, b phase) int { return a.At.Compare(b.At) })
	return out
}

type regionView struct {
	Name string
	apiclient.RegionInstances
}

// instanceView is an instance of a deployment with its node's name.
type instanceView struct {
	apiclient.Instance
	Node string // the node's hostname, or its id when it is not known
}

// deploymentsView is the live part of the project page.
type deploymentsView struct {
	Project     string
	CSRF        string
	Items       []deploymentView
	Live        *deploymentView
	CanRollBack bool // an earlier healthy deployment exists
	More        bool // older deployments are not shown
}

// nodeNames maps node ids to hostnames when a deployment has instances
// (one query more; none when nothing runs).
func (c *Console) nodeNames(r *http.Request, s *session, ds []apiclient.DeploymentDetail) (map[string]string, error) {
	out := map[string]string{}
	for _, d := range ds {
		if len(d.Instances) == 0 {
			continue
		}
		ns, err := c.backend.Nodes(r.Context(), s.Principal)
		if err != nil {
			return nil, err
		}
		for _, n := range ns {
			out[n.ID] = n.Hostname
		}
		break
	}
	return out, nil
}

func newDeploymentsView(project string, s *session, ds []apiclient.DeploymentDetail, nodes map[string]string) deploymentsView {
	v := deploymentsView{Project: project, CSRF: s.csrf, More: len(ds) >= deploymentsShown}
	var live *apiclient.DeploymentDetail
	for i := range ds {
		if ds[i].Active {
			live = &ds[i]
		}
	}
	for _, d := range ds {
		dv := deploymentView{DeploymentDetail: d, Name: strings.SplitN(d.Hostname, ".", 2)[0]}
		dv.Phases = phases(d.Deployment)
		desired := 0
		for name, ri := range d.Regions {
			dv.Regions = append(dv.Regions, regionView{name, ri})
			desired += ri.Desired
		}
		slices.SortFunc(dv.Regions, func(a, b regionView) int { return strings.Compare(a.Name, b.Name) })
		for _, in := range d.Instances {
			node := nodes[in.NodeID]
			if node == "" {
				node = in.NodeID
			}
			dv.Instances = append(dv.Instances, instanceView{Instance: in, Node: node})
		}
		slices.SortFunc(dv.Instances, func(a, b instanceView) int {
			if c := strings.Compare(a.Region, b.Region); c != 0 {
				return c
			}
			if c := strings.Compare(a.Node, b.Node); c != 0 {
				return c
			}
			return strings.Compare(a.ID, b.ID)
		})
		dv.InProgress = !d.Active && inProgress(d.Status)
		wasHealthy := d.HealthyAt != nil && (d.Status == "healthy" || d.Status == "superseded")
		if !d.Active && !d.Preview && wasHealthy {
			if live == nil || d.CreatedAt.After(live.CreatedAt) {
				dv.Promote = true
			} else {
				dv.RollBack = true
				v.CanRollBack = true
			}
		}
		dv.Stop = !d.Active && d.Status != "failed" && d.Status != "stopped" && (d.Status != "superseded" || desired > 0)
		v.Items = append(v.Items, dv)
		if d.Active {
			v.Live = &v.Items[len(v.Items)-1]
		}
	}
	return v
}

// etag identifies what the deployments fragment shows (not when it was
// rendered), so a poll that finds nothing new gets a 304.
func (v deploymentsView) ETag() string {
	b, _ := json.Marshal(struct {
		Items []deploymentView
		CSRF  string
	}{v.Items, v.CSRF})
	sum := sha256.Sum256(b)
	return `"` + hex.EncodeToString(sum[:12]) + `"`
}

// projectForm is the state of the project page's forms after a failed
// submission: which form, what went wrong, what to fill in again (never
// a secret value).
type projectForm struct {
	Which  string // deploy, env, domain, scale
	Error  string
	Values map[string]string
}

// projectView is the project page.
type projectView struct {
	Project     *apiclient.Project
	Deployments deploymentsView
	Env         []apiclient.EnvVar
	Domains     []apiclient.Domain
	Form        projectForm
	PollMS      int64
}

func (c *Console) projectPage(w http.ResponseWriter, r *http.Request, s *session) error {
	return c.showProject(w, r, s, http.StatusOK, projectForm{})
}

func (c *Console) showProject(w http.ResponseWriter, r *http.Request, s *session, status int, form projectForm) error {
	ctx, name := r.Context(), r.PathValue("project")
	p, err := c.backend.Project(ctx, s.Principal, name)
	if err != nil {
		return err
	}
	ds, err := c.backend.Deployments(ctx, s.Principal, p.ID, deploymentsShown)
	if err != nil {
		return err
	}
	env, err := c.backend.Env(ctx, s.Principal, p.ID)
	if err != nil {
		return err
	}
	doms, err := c.backend.Domains(ctx, s.Principal, p.ID)
	if err != nil {
		return err
	}
	if form.Values == nil {
		form.Values = map[string]string{}
	}
	nodes, err := c.nodeNames(r, s, ds)
	if err != nil {
		return err
	}
	v := &projectView{Project: p, Deployments: newDeploymentsView(p.Name, s, ds, nodes), Env: env, Domains: doms, Form: form,
		PollMS: c.cfg.Poll.Milliseconds()}
	c.render(w, r, status, "project", &view{Title: p.Name, Nav: "projects", Session: s, Flash: c.takeFlash(w, r), Data: v})
	return nil
}

// deploymentsFragment is the deployments list alone, polled by the page.
func (c *Console) deploymentsFragment(w http.ResponseWriter, r *http.Request, s *session) error {
	p, err := c.backend.Project(r.Context(), s.Principal, r.PathValue("project"))
	if err != nil {
		return err
	}
	ds, err := c.backend.Deployments(r.Context(), s.Principal, p.ID, deploymentsShown)
	if err != nil {
		return err
	}
	nodes, err := c.nodeNames(r, s, ds)
	if err != nil {
		return err
	}
	v := newDeploymentsView(p.Name, s, ds, nodes)
	tag := v.ETag()
	w.Header().Set("ETag", tag)
	if r.Header.Get("If-None-Match") == tag {
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusNotModified)
		return nil
	}
	c.renderFragment(w, "deployments", v)
	return nil
}

// failOn re-renders the project page with the form's problem when err is
// one the user can act on.
func (c *Console) failOn(w http.ResponseWriter, r *http.Request, s *session, err error, which string, values map[string]string) error {
	if e := userError(err); e != nil && e.Status != http.StatusNotFound {
		return c.showProject(w, r, s, e.Status, projectForm{Which: which, Error: e.Message, Values: values})
	}
	return err
}

func (c *Console) backTo(w http.ResponseWriter, r *http.Request, anchor, msg string) error {
	c.flash(w, r, msg)
	http.Redirect(w, r, projectPath(r.PathValue("project"))+"#"+anchor, http.StatusSeeOther)
	return nil
}

func (c *Console) deploy(w http.ResponseWriter, r *http.Request, s *session) error {
	req := apiclient.DeployRequest{Image: strings.TrimSpace(r.PostForm.Get("image")), CommitSHA: strings.TrimSpace(r.PostForm.Get("commit_sha"))}
	d, err := c.backend.Deploy(r.Context(), s.Principal, r.PathValue("project"), req)
	if err != nil {
		return c.failOn(w, r, s, err, "deploy", map[string]string{"image": req.Image, "commit_sha": req.CommitSHA})
	}
	return c.backTo(w, r, "deployments", "Deployment "+hostLabel(d.Hostname)+" started. It goes live once its instances are healthy.")
}

func hostLabel(host string) string { return strings.SplitN(host, ".", 2)[0] }

// confirmed reports whether the user confirmed a destructive action. The
// script asks in the page (and sets confirmed=1); without script the
// server asks on a page of its own that posts the same form again.
func (c *Console) confirmed(w http.ResponseWriter, r *http.Request, s *session, question, button, back string) bool {
	if r.PostForm.Get("confirmed") == "1" {
		return true
	}
	fields := map[string]string{}
	for k := range r.PostForm {
		if k != "csrf" && k != "confirmed" {
			fields[k] = r.PostForm.Get(k)
		}
	}
	c.render(w, r, http.StatusOK, "confirm", &view{Title: "Confirm", Session: s,
		Data: map[string]any{"Question": question, "Button": button, "Action": r.URL.EscapedPath(), "Fields": fields, "Back": back}})
	return false
}

func (c *Console) promote(w http.ResponseWriter, r *http.Request, s *session) error {
	d, err := c.backend.Deployment(r.Context(), s.Principal, r.PathValue("id"))
	if err != nil {
		return err
	}
	if !c.confirmed(w, r, s, "Send production traffic of "+r.PathValue("project")+" to "+hostLabel(d.Hostname)+"?", "Promote", projectPath(r.PathValue("project"))) {
		return nil
	}
	d, err = c.backend.Promote(r.Context(), s.Principal, d.ID)
	if err != nil {
		return c.failOn(w, r, s, err, "deployments", nil)
	}
	return c.backTo(w, r, "deployments", switchNotice(d, "promoted"))
}

func switchNotice(d *apiclient.DeploymentDetail, verb string) string {
	if d.Active {
		return hostLabel(d.Hostname) + " " + verb + ": it serves production now."
	}
	return hostLabel(d.Hostname) + " is starting again; it serves production once its instances are healthy."
}

func (c *Console) rollback(w http.ResponseWriter, r *http.Request, s *session) error {
	target := r.PostForm.Get("deployment_id")
	q := "Roll production of " + r.PathValue("project") + " back to the previous healthy deployment?"
	if target != "" {
		d, err := c.backend.Deployment(r.Context(), s.Principal, target)
		if err != nil {
			return err
		}
		q = "Roll production of " + r.PathValue("project") + " back to " + hostLabel(d.Hostname) + "?"
	}
	if !c.confirmed(w, r, s, q, "Roll back", projectPath(r.PathValue("project"))) {
		return nil
	}
	d, err := c.backend.Rollback(r.Context(), s.Principal, r.PathValue("project"), target)
	if err != nil {
		return c.failOn(w, r, s, err, "deployments", nil)
	}
	return c.backTo(w, r, "deployments", switchNotice(d, "is back"))
}

func (c *Console) stop(w http.ResponseWriter, r *http.Request, s *session) error {
	d, err := c.backend.Deployment(r.Context(), s.Principal, r.PathValue("id"))
	if err != nil {
		return err
	}
	if !c.confirmed(w, r, s, "Stop "+hostLabel(d.Hostname)+"? Its instances shut down and its URL stops answering.", "Stop", projectPath(r.PathValue("project"))) {
		return nil
	}
	if _, err := c.backend.Stop(r.Context(), s.Principal, d.ID); err != nil {
		return c.failOn(w, r, s, err, "deployments", nil)
	}
	return c.backTo(w, r, "deployments", "Stopped "+hostLabel(d.Hostname)+".")
}

func (c *Console) setEnv(w http.ResponseWriter, r *http.Request, s *session) error {
	name := strings.TrimSpace(r.PostForm.Get("name"))
	value := r.PostForm.Get("value")
	if name == "" {
		return c.showProject(w, r, s, http.StatusBadRequest, projectForm{Which: "env", Error: "Enter a variable name."})
	}
	err := c.backend.SetEnv(r.Context(), s.Principal, r.PathValue("project"), map[string]string{name: value})
	if err != nil {
		// The value is not put back into the form: it is a secret.
		return c.failOn(w, r, s, err, "env", map[string]string{"name": name})
	}
	return c.backTo(w, r, "env", "Set "+name+". The new value applies to the next deploy.")
}

func (c *Console) unsetEnv(w http.ResponseWriter, r *http.Request, s *session) error {
	name := r.PathValue("name")
	if !c.confirmed(w, r, s, "Remove the variable "+name+" from "+r.PathValue("project")+"? The next deploy runs without it.", "Remove", projectPath(r.PathValue("project"))) {
		return nil
	}
	if err := c.backend.UnsetEnv(r.Context(), s.Principal, r.PathValue("project"), name); err != nil {
		return c.failOn(w, r, s, err, "env", nil)
	}
	return c.backTo(w, r, "env", "Removed "+name+". The next deploy runs without it.")
}

func (c *Console) addDomain(w http.ResponseWriter, r *http.Request, s *session) error {
	name := strings.TrimSpace(r.PostForm.Get("name"))
	d, err := c.backend.AddDomain(r.Context(), s.Principal, r.PathValue("project"), name)
	if err != nil {
		return c.failOn(w, r, s, err, "domain", map[string]string{"name": name})
	}
	return c.backTo(w, r, "domain-"+d.Name, "Added "+d.Name+". Create one of its DNS records below, then choose Verify.")
}

func (c *Console) verifyDomain(w http.ResponseWriter, r *http.Request, s *session) error {
	d, err := c.backend.VerifyDomain(r.Context(), s.Principal, r.PathValue("id"))
	if err != nil {
		return c.failOn(w, r, s, err, "domain", nil)
	}
	if d.Verified {
		return c.backTo(w, r, "domain-"+d.Name, d.Name+" is verified: it serves the production deployment.")
	}
	return c.backTo(w, r, "domain-"+d.Name, d.Name+" is not verified yet: "+d.LastError)
}

func (c *Console) removeDomain(w http.ResponseWriter, r *http.Request, s *session) error {
	name := r.PostForm.Get("name")
	if !c.confirmed(w, r, s, "Remove the domain "+name+"? It stops serving "+r.PathValue("project")+" at once.", "Remove", projectPath(r.PathValue("project"))) {
		return nil
	}
	if err := c.backend.RemoveDomain(r.Context(), s.Principal, r.PathValue("id")); err != nil {
		return c.failOn(w, r, s, err, "domain", nil)
	}
	return c.backTo(w, r, "domains", "Removed "+name+".")
}

func (c *Console) scale(w http.ResponseWriter, r *http.Request, s *session) error {
	raw := strings.TrimSpace(r.PostForm.Get("min_instances"))
	n, err := strconv.Atoi(raw)
	if err != nil {
		return c.showProject(w, r, s, http.StatusBadRequest, projectForm{Which: "scale", Error: "Instances per region must be a whole number.",
			Values: map[string]string{"min_instances": raw}})
	}
	p, err := c.backend.UpdateProject(r.Context(), s.Principal, r.PathValue("project"), apiclient.ProjectSpec{MinInstancesPerRegion: &n})
	if err != nil {
		return c.failOn(w, r, s, err, "scale", map[string]string{"min_instances": raw})
	}
	return c.backTo(w, r, "scale", fmt.Sprintf("%s runs %d instances per region now; running deployments scale to match.", p.Name, p.MinInstancesPerRegion))
}

// tokenRow is a line of the tokens list.
type tokenRow struct {
	Token
	Current bool // this session's token
}

func (c *Console) orgPage(w http.ResponseWriter, r *http.Request, s *session) error {
	return c.showOrg(w, r, s, http.StatusOK, "", nil, "")
}

func (c *Console) showOrg(w http.ResponseWriter, r *http.Request, s *session, status int, problem string, created *apiclient.NewToken, name string) error {
	ts, err := c.backend.Tokens(r.Context(), s.Principal)
	if err != nil {
		return err
	}
	rows := make([]tokenRow, 0, len(ts))
	for _, t := range ts {
		rows = append(rows, tokenRow{Token: t, Current: t.ID == s.TokenID.String()})
	}
	c.render(w, r, status, "org", &view{Title: "Organisation " + s.OrgName, Nav: "org", Session: s, Flash: c.takeFlash(w, r), Error: problem,
		Data: map[string]any{"Tokens": rows, "Created": created, "Name": name}})
	return nil
}

func (c *Console) createToken(w http.ResponseWriter, r *http.Request, s *session) error {
	name := strings.TrimSpace(r.PostForm.Get("name"))
	if name == "" {
		return c.showOrg(w, r, s, http.StatusBadRequest, "Give the token a name that says where it is used, e.g. ci or laptop.", nil, name)
	}
	t, err := c.backend.CreateToken(r.Context(), s.Principal, name)
	if e := userError(err); e != nil {
		return c.showOrg(w, r, s, e.Status, e.Message, nil, name)
	}
	if err != nil {
		return err
	}
	// The secret is in this answer only (no redirect: it must not travel
	// in a URL or a cookie); the page is not cached.
	return c.showOrg(w, r, s, http.StatusCreated, "", t, "")
}

func (c *Console) revokeToken(w http.ResponseWriter, r *http.Request, s *session) error {
	id := r.PathValue("id")
	name := r.PostForm.Get("name")
	q := "Revoke the token " + name + "? Everything that uses it stops working at once."
	if id == s.TokenID.String() {
		q = "Revoke the token " + name + "? This session uses it: you will be signed out."
	}
	if !c.confirmed(w, r, s, q, "Revoke", "/org") {
		return nil
	}
	if err := c.backend.RevokeToken(r.Context(), s.Principal, id); err != nil {
		return err
	}
	if id == s.TokenID.String() {
		c.clearCookie(w, r, sessionCookie)
		c.flash(w, r, "You revoked the token this session used. Sign in with another token.")
		http.Redirect(w, r, "/signin", http.StatusSeeOther)
		return nil
	}
	c.flash(w, r, "Revoked the token "+name+".")
	http.Redirect(w, r, "/org#tokens", http.StatusSeeOther)
	return nil
}
