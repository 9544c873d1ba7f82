package operator

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/httpjson"
	ib "github.com/zeitwork/zeitwork/internal/imagebuild"
	"github.com/zeitwork/zeitwork/internal/operator/agents/agenttest"
)

// newBuildEnv is newEnv with a registry for built images (BUILD_REGISTRY).
func newBuildEnv(t *testing.T, configure ...func(*Config)) (*env, string) {
	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(reg.Close)
	host := strings.TrimPrefix(reg.URL, "http://")
	e := newEnv(t, append([]func(*Config){func(c *Config) { c.BuildRegistry = host }}, configure...)...)
	return e, host
}

// setBuildSlots gives e.agents[i] slots[i] build slots (0 for the rest)
// and waits until the operator has them.
func (e *env) setBuildSlots(slots ...int) {
	e.t.Helper()
	want := map[string]int{}
	for i, a := range e.agents {
		n := 0
		if i < len(slots) {
			n = slots[i]
		}
		a.SetMaxBuilds(n)
		want[a.ID] = n
	}
	e.eventually("nodes report their build slots", func() bool {
		for id, n := range want {
			var got int
			if err := e.ops[0].pool.QueryRow(e.t.Context(), "SELECT max_builds FROM nodes WHERE id = $1", id).Scan(&got); err != nil || got != n {
				return false
			}
		}
		return true
	})
}

// pushBuilt plays a successful build: it pushes an image to the spec's
// target tag and reports its digest reference.
func (e *env) pushBuilt(spec build.Spec) *agenttest.BuildResult {
	l, _ := ib.Layer(ib.Entry{Name: "version", Data: []byte(spec.ID)})
	img, _ := ib.Image(ib.Config{Cmd: []string{"/app"}}, l)
	ref, err := ib.Push(e.t.Context(), spec.Image, img)
	if err != nil {
		return &agenttest.BuildResult{Error: "push: " + err.Error()}
	}
	return &agenttest.BuildResult{Image: ref, Lines: []string{"STEP 1/2: FROM scratch", "STEP 2/2: COPY . /", "pushed " + ref}, Steps: 2, CacheHits: 1}
}

func (e *env) push(repo, sha, branch, delivery string) []string {
	e.t.Helper()
	payload, err := os.ReadFile("testdata/push.json")
	if err != nil {
		e.t.Fatal(err)
	}
	payload = bytes.ReplaceAll(payload, []byte("REPO"), []byte(repo))
	payload = bytes.ReplaceAll(payload, []byte("AFTER"), []byte(sha))
	payload = bytes.ReplaceAll(payload, []byte(`"refs/heads/main"`), []byte(`"refs/heads/`+branch+`"`))
	var res struct {
		Deployments []string `json:"deployments"`
	}
	if code := e.call("", "POST", "/api/v1/github/webhook", string(payload), &res, "X-GitHub-Event", "push", "X-GitHub-Delivery", delivery,
		"X-Hub-Signature-256", sign(payload)); code != 202 {
		e.t.Fatalf("push %s: %d", sha, code)
	}
	return res.Deployments
}

func (e *env) getBuild(tok, id string) Build {
	e.t.Helper()
	var b Build
	if code := e.call(tok, "GET", "/api/v1/builds/"+id, nil, &b); code != 200 {
		e.t.Fatalf("build %s: %d", id, code)
	}
	return b
}

// buildLog reads a build's log through the API.
func (e *env) buildLog(tok, id string, follow bool) []build.LogLine {
	e.t.Helper()
	q := ""
	if follow {
		q = "?follow=1"
	}
	req, _ := http.NewRequestWithContext(e.t.Context(), "GET", e.url+"/api/v1/builds/"+id+"/logs"+q, nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-ndjson" {
		e.t.Fatalf("build logs: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var out []build.LogLine
	for sc := bufio.NewScanner(resp.Body); sc.Scan(); {
		var l build.LogLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			e.t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		out = append(out, l)
	}
	return out
}

func lineTexts(ls []build.LogLine) string {
	var b strings.Builder
	for _, l := range ls {
		b.WriteString(l.Line + "\n")
	}
	return b.String()
}

// agentWithBuild finds the agent holding a build.
func (e *env) agentWithBuild(id string) *agenttest.Agent {
	for _, a := range e.agents {
		if a.BuildState(id) != "" {
			return a
		}
	}
	return nil
}

func specOf(e *env, id string) (build.Spec, bool) {
	for _, a := range e.agents {
		for _, s := range a.BuildSpecs() {
			if s.ID == id {
				return s, true
			}
		}
	}
	return build.Spec{}, false
}

func targz(t testing.TB, files map[string]string) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for name, data := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		_, _ = tw.Write([]byte(data))
	}
	_ = tw.Close()
	_ = zw.Close()
	return buf.Bytes()
}

// TestBuildLifecycle: a push to a project without an image template
// builds it on a node, deploys the pushed image and keeps the log; the
// next build goes to the node with the layer cache; a failed build fails
// its deployment and production stays; uploaded sources build too.
func TestBuildLifecycle(t *testing.T) {
	t.Parallel()
	e, reg := newBuildEnv(t, func(c *Config) { c.MaxSourceBytes = 1 << 20 })
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	other, _ := e.ops[0].Bootstrap(t.Context(), "other", "ops@other.test", "t")
	e.setBuildSlots(1, 1, 1)
	for _, a := range e.agents {
		a.OnBuild(e.pushBuilt)
	}

	// Build settings are validated and the git token is write-only.
	for _, tc := range []struct {
		body map[string]any
		want string
	}{
		{map[string]any{"name": "x", "github_repo": "acme/x", "dockerfile": "../Dockerfile"}, "dockerfile"},
		{map[string]any{"name": "x", "github_repo": "acme/x", "build_context": "/src"}, "absolute"},
		{map[string]any{"name": "x", "git_url": "ext::sh -c touch% /tmp/pwned"}, "git_url"},
		{map[string]any{"name": "x", "git_url": "https://user:pw@git.example.com/x.git"}, "credentials"},
		{map[string]any{"name": "x", "git_url": "file:///etc"}, "scheme"},
	} {
		var ae httpjson.ErrorBody
		if code := e.call(tok, "POST", "/api/v1/projects", tc.body, &ae); code != 400 || !strings.Contains(ae.Error.Message, tc.want) {
			t.Errorf("%v: %d %+v", tc.body, code, ae)
		}
	}
	var p Project
	if code := e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "github_repo": "acme/web", "min_instances_per_region": 1,
		"dockerfile": "docker/Dockerfile.prod", "build_context": "app", "git_token": "ghp_s3cret"}, &p); code != 201 {
		t.Fatalf("create project: %d", code)
	}
	if !p.BuildsFromSource || !p.GitTokenSet || p.Dockerfile != "docker/Dockerfile.prod" || p.BuildContext != "app" {
		t.Fatalf("project: %+v", p)
	}
	var raw map[string]any
	e.call(tok, "GET", "/api/v1/projects/web", nil, &raw)
	if s := fmt.Sprint(raw); strings.Contains(s, "ghp_s3cret") {
		t.Fatalf("git token returned: %s", s)
	}
	var stored []byte
	_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT git_token_ciphertext FROM projects WHERE name = 'web'").Scan(&stored)
	if len(stored) == 0 || bytes.Contains(stored, []byte("ghp_s3cret")) {
		t.Fatal("git token not sealed")
	}
	// A commit of a build project must be the full id.
	var ae httpjson.ErrorBody
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"commit_sha": "abc1234"}, &ae); code != 400 || !strings.Contains(ae.Error.Message, "full") {
		t.Fatalf("short sha: %d %+v", code, ae)
	}

	// Push → queued build → built on a node → deployed with the pushed image.
	sha1 := strings.Repeat("a1", 20)
	ids := e.push("acme/web", sha1, "main", "b-1")
	if len(ids) != 1 {
		t.Fatalf("push: %v", ids)
	}
	d := e.waitDeployment(tok, ids[0], "active", "failed")
	if d.Status != "active" || d.Build == nil || d.Build.State != build.StateSucceeded || d.BuildingAt == nil || d.PreparingAt == nil {
		t.Fatalf("built deployment: %+v %+v", d, d.Build)
	}
	b := e.getBuild(tok, d.Build.ID.String())
	if b.ImageDigestRef == "" || d.Image != b.ImageDigestRef || !strings.HasSuffix(d.ImageDigest, b.ImageDigestRef[strings.Index(b.ImageDigestRef, "@")+1:]) {
		t.Fatalf("deployment image %q (%s), build %+v", d.Image, d.ImageDigest, b)
	}
	if b.Image != reg+"/acme/web:"+sha1 || b.CommitSHA != sha1 || b.Branch != "main" || b.SourceKind != "git" || b.Steps != 2 || b.CacheHits != 1 || b.NodeID == nil || b.FinishedAt == nil {
		t.Fatalf("build: %+v", b)
	}
	spec, ok := specOf(e, b.ID.String())
	if !ok || spec.Source.GitURL != "https://github.com/acme/web.git" || spec.Source.CommitSHA != sha1 || spec.Source.GitToken != "ghp_s3cret" ||
		spec.Dockerfile != "docker/Dockerfile.prod" || spec.Context != "app" || spec.TimeoutS != 900 || spec.ProjectID != p.ID.String() ||
		spec.DeploymentID != d.ID.String() {
		t.Fatalf("spec: %+v", spec)
	}
	if r := e.routeFor("web-acme.zeitwork.test"); r == nil || r.DeploymentID != d.ID {
		t.Fatalf("alias: %+v", r)
	}
	// The node forgets the build once its log is saved; the log is then
	// served from PostgreSQL.
	e.eventually("build deleted on its node", func() bool { return e.agentWithBuild(b.ID.String()) == nil })
	logs := e.buildLog(tok, b.ID.String(), true)
	if txt := lineTexts(logs); !strings.Contains(txt, "STEP 2/2: COPY . /") || !strings.Contains(txt, "pushed "+b.ImageDigestRef) || len(logs) != 4 {
		t.Fatalf("stored log: %q", txt)
	}

	// Another organisation sees none of it.
	for _, path := range []string{"/api/v1/builds/" + b.ID.String(), "/api/v1/builds/" + b.ID.String() + "/logs", "/api/v1/projects/web/builds"} {
		if code := e.call(other, "GET", path, nil, nil); code != 404 {
			t.Fatalf("%s by another org: %d", path, code)
		}
	}
	var list struct {
		Builds []Build `json:"builds"`
	}
	if code := e.call(tok, "GET", "/api/v1/projects/web/builds", nil, &list); code != 200 || len(list.Builds) != 1 || list.Builds[0].ID != b.ID {
		t.Fatalf("builds: %d %+v", code, list)
	}

	// The next build goes to the node that has the project's layer cache.
	sha2 := strings.Repeat("b2", 20)
	ids = e.push("acme/web", sha2, "main", "b-2")
	d2 := e.waitDeployment(tok, ids[0], "active", "failed")
	if d2.Status != "active" {
		t.Fatalf("second build: %s %s", d2.Status, d2.FailureReason)
	}
	if b2 := e.getBuild(tok, d2.Build.ID.String()); *b2.NodeID != *b.NodeID {
		t.Fatalf("second build on node %s, the cache is on %s", b2.NodeID, b.NodeID)
	}

	// A failing build fails its deployment; production stays where it is.
	for _, a := range e.agents {
		a.OnBuild(func(build.Spec) *agenttest.BuildResult {
			return &agenttest.BuildResult{Error: "RUN make: exit status 2\nmake: *** No rule to make target 'all'", Lines: []string{"STEP 1/2: RUN make", "make: *** No rule to make target 'all'"}}
		})
	}
	sha3 := strings.Repeat("c3", 20)
	ids = e.push("acme/web", sha3, "main", "b-3")
	d3 := e.waitDeployment(tok, ids[0], "active", "failed")
	if d3.Status != "failed" || !strings.HasPrefix(d3.FailureReason, "build failed: RUN make: exit status 2") || d3.Build.State != build.StateFailed {
		t.Fatalf("failed build: %s %q %+v", d3.Status, d3.FailureReason, d3.Build)
	}
	if r := e.routeFor("web-acme.zeitwork.test"); r == nil || r.DeploymentID != d2.ID {
		t.Fatalf("alias moved for a failed build: %+v", r)
	}
	e.eventually("failed build deleted on its node", func() bool { return e.agentWithBuild(d3.Build.ID.String()) == nil })
	if txt := lineTexts(e.buildLog(tok, d3.Build.ID.String(), false)); !strings.Contains(txt, "No rule to make target") {
		t.Fatalf("failed build's log: %q", txt)
	}

	// A followed log streams from the node while the build runs and ends
	// with it; stopping a building deployment cancels its build.
	for _, a := range e.agents {
		a.OnBuild(nil)
	}
	ids = e.push("acme/web", strings.Repeat("d4", 20), "main", "b-4")
	d4 := e.waitDeployment(tok, ids[0], "building")
	var holder *agenttest.Agent
	e.eventually("build running on a node", func() bool { holder = e.agentWithBuild(d4.Build.ID.String()); return holder != nil })
	followed := make(chan []build.LogLine, 1)
	go func() { followed <- e.buildLog(tok, d4.Build.ID.String(), true) }()
	time.Sleep(300 * time.Millisecond)
	for i := range 5 {
		if err := holder.Log(d4.Build.ID.String(), fmt.Sprintf("line %d", i)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := holder.FinishBuild(d4.Build.ID.String(), agenttest.BuildResult{Error: "boom"}); err != nil {
		t.Fatal(err)
	}
	select {
	case ls := <-followed:
		if txt := lineTexts(ls); !strings.Contains(txt, "started\nline 0\nline 1\nline 2\nline 3\nline 4\n") {
			t.Fatalf("followed log: %q", txt)
		}
		for i := 1; i < len(ls); i++ {
			if ls[i].Seq <= ls[i-1].Seq {
				t.Fatalf("seq not increasing: %+v", ls)
			}
		}
	case <-time.After(30 * time.Second):
		t.Fatal("following the log did not end with the build")
	}
	e.waitDeployment(tok, d4.ID.String(), "failed")

	ids = e.push("acme/web", strings.Repeat("e5", 20), "main", "b-5")
	d5 := e.waitDeployment(tok, ids[0], "building")
	e.eventually("build running on a node", func() bool { holder = e.agentWithBuild(d5.Build.ID.String()); return holder != nil })
	var stopped Deployment
	if code := e.call(tok, "POST", "/api/v1/deployments/"+d5.ID.String()+"/stop", nil, &stopped); code != 200 || stopped.Status != "stopped" || stopped.Build.State != build.StateCanceled {
		t.Fatalf("stop: %d %+v", code, stopped)
	}
	e.eventually("the node canceled the build", func() bool {
		st := holder.BuildState(d5.Build.ID.String())
		return st == build.StateCanceled || st == ""
	})

	// Uploaded sources: gzip only, size-limited, then built and deleted.
	for _, a := range e.agents {
		a.OnBuild(e.pushBuilt)
	}
	if code := e.call(tok, "POST", "/api/v1/projects/web/sources", "not gzip", &ae, "Content-Type", "application/gzip"); code != 400 || !strings.Contains(ae.Error.Message, "gzip") {
		t.Fatalf("not gzip: %d %+v", code, ae)
	}
	archive := targz(t, map[string]string{"Dockerfile": "FROM scratch\n", "app/main.go": "package main\n"})
	if code := e.call(tok, "POST", "/api/v1/projects/web/sources", string(archive), &ae, "Content-Type", "application/json"); code != 400 || !strings.Contains(ae.Error.Message, "application/gzip") {
		t.Fatalf("wrong content type: %d %+v", code, ae)
	}
	big := make([]byte, 2<<20)
	if code := e.call(tok, "POST", "/api/v1/projects/web/sources", string(big), &ae, "Content-Type", "application/gzip"); code != 413 || ae.Error.Code != "too_large" || !strings.Contains(ae.Error.Message, "larger than 1 MiB") {
		t.Fatalf("too large: %d %+v", code, ae)
	}
	if code := e.call(other, "POST", "/api/v1/projects/web/sources", string(archive), nil, "Content-Type", "application/gzip"); code != 404 {
		t.Fatalf("upload to another org's project: %d", code)
	}
	var src struct {
		SourceID string `json:"source_id"`
		SHA256   string `json:"sha256"`
		Size     int    `json:"size"`
	}
	if code := e.call(tok, "POST", "/api/v1/projects/web/sources", string(archive), &src, "Content-Type", "application/gzip"); code != 201 || src.Size != len(archive) {
		t.Fatalf("upload: %d %+v", code, src)
	}
	sum := sha256.Sum256(archive)
	if src.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("sha256 %s", src.SHA256)
	}
	fetched := make(chan []byte, 1)
	for _, a := range e.agents {
		a.OnBuild(func(spec build.Spec) *agenttest.BuildResult {
			req, _ := http.NewRequest("GET", e.url+spec.Source.ArchivePath, nil)
			req.Header.Set("Authorization", "Bearer "+clusterToken)
			if resp, err := http.DefaultClient.Do(req); err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.Header.Get("X-Zeitwork-Source-SHA256") == src.SHA256 {
					fetched <- body
				}
			}
			return e.pushBuilt(spec)
		})
	}
	if code := e.call(other, "POST", "/api/v1/projects/web/deployments", map[string]any{"source_id": src.SourceID}, nil); code != 404 {
		t.Fatalf("another org deploying the source: %d", code)
	}
	var ds Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"source_id": src.SourceID}, &ds); code != 202 || ds.Build == nil {
		t.Fatalf("deploy source: %d %+v", code, ds)
	}
	var again Deployment
	if e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"source_id": src.SourceID}, &again); again.ID != ds.ID {
		t.Fatalf("the same source deployed twice: %s %s", ds.ID, again.ID)
	}
	ds = e.waitDeployment(tok, ds.ID.String(), "active", "failed")
	if ds.Status != "active" {
		t.Fatalf("source deployment: %s %s", ds.Status, ds.FailureReason)
	}
	select {
	case got := <-fetched:
		if !bytes.Equal(got, archive) {
			t.Fatal("the node fetched other bytes than were uploaded")
		}
	default:
		t.Fatal("the node did not fetch the source")
	}
	bs := e.getBuild(tok, ds.Build.ID.String())
	if bs.SourceKind != "archive" || bs.Image != reg+"/acme/web:src-"+src.SHA256[:12] || bs.SourceSHA256 != src.SHA256 {
		t.Fatalf("source build: %+v", bs)
	}
	var n int
	_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT count(*) FROM build_sources").Scan(&n)
	if n != 0 {
		t.Fatalf("%d sources kept after their build ended", n)
	}
	if code := e.call(clusterToken, "GET", "/api/v1/internal/sources/"+src.SourceID, nil, nil); code != 404 {
		t.Fatalf("deleted source: %d", code)
	}
	if code := e.call(tok, "GET", "/api/v1/internal/sources/"+src.SourceID, nil, nil); code != 401 {
		t.Fatalf("internal source with a user token: %d", code)
	}

	// The typed client (what the CLI uses) reads the same documents.
	c := apiclient.New(e.url, tok)
	ctx := t.Context()
	if list, err := c.Builds(ctx, "web"); err != nil || len(list) != 6 || list[0].ID != bs.ID.String() || list[0].SourceKind != "archive" {
		t.Fatalf("client builds: %+v %v", list, err)
	}
	if cb, err := c.Build(ctx, b.ID.String()); err != nil || cb.ImageDigestRef != b.ImageDigestRef || cb.State != "succeeded" || cb.StartedAt == nil {
		t.Fatalf("client build: %+v %v", cb, err)
	}
	if cd, err := c.Deployment(ctx, ds.ID.String()); err != nil || cd.Build == nil || cd.Build.ID != bs.ID.String() || cd.BuildingAt == nil {
		t.Fatalf("client deployment: %+v %v", cd, err)
	}
	body, err := c.BuildLogs(ctx, b.ID.String(), true)
	if err != nil {
		t.Fatal(err)
	}
	all, _ := io.ReadAll(body)
	body.Close()
	if !strings.Contains(string(all), `"line":"STEP 2/2: COPY . /"`) {
		t.Fatalf("client build logs: %s", all)
	}
	up, err := c.UploadSource(ctx, "web", bytes.NewReader(archive))
	if err != nil || up.SHA256 != src.SHA256 || up.SourceID == src.SourceID {
		t.Fatalf("client upload: %+v %v", up, err)
	}
	var apiErr *apiclient.Error
	if _, err := c.UploadSource(ctx, "web", strings.NewReader("nope")); !errors.As(err, &apiErr) || apiErr.Status != 400 || !strings.Contains(apiErr.Message, "gzip") {
		t.Fatalf("client upload of non-gzip: %v", err)
	}
}

// TestBuildScheduling: newer queued builds supersede older ones of a
// branch, nodes run at most max_builds, and one slot alternates between
// organisations.
func TestBuildScheduling(t *testing.T) {
	t.Parallel()
	e, _ := newBuildEnv(t)
	acme, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	other, _ := e.ops[0].Bootstrap(t.Context(), "other", "ops@other.test", "t")
	orgOf := map[string]string{}
	for org, tok := range map[string]string{"acme": acme, "other": other} {
		var p Project
		if code := e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "github_repo": org + "/web", "min_instances_per_region": 1}, &p); code != 201 {
			t.Fatalf("create project: %d", code)
		}
		orgOf[p.ID.String()] = org
	}
	deploy := func(tok, sha, branch string) Deployment {
		t.Helper()
		var d Deployment
		if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"commit_sha": sha, "branch": branch}, &d); code != 202 || d.Build == nil {
			t.Fatalf("deploy %s: %d %+v", sha, code, d)
		}
		return d
	}
	sha := func(i int) string { return fmt.Sprintf("%040x", i) }

	// No slots: two pushes to main queue; the newer supersedes the older.
	old := deploy(acme, sha(1), "main")
	newer := deploy(acme, sha(2), "main")
	d := e.waitDeployment(acme, old.ID.String(), "superseded")
	if !strings.Contains(d.FailureReason, sha(2)) || d.Build.State != build.StateCanceled {
		t.Fatalf("superseded: %q %+v", d.FailureReason, d.Build)
	}
	if d := e.waitDeployment(acme, newer.ID.String(), "building"); d.Build.State != build.StateQueued {
		t.Fatalf("newer build: %+v", d.Build)
	}

	// One node with two slots runs two builds at a time.
	node := e.agents[0]
	e.setBuildSlots(2)
	more := []Deployment{deploy(acme, sha(3), "b3"), deploy(acme, sha(4), "b4")}
	e.eventually("two builds running", func() bool { return node.RunningBuilds() == 2 })
	time.Sleep(time.Second) // a few passes: the third waits
	if node.RunningBuilds() != 2 || node.PeakBuilds() != 2 {
		t.Fatalf("%d running, peak %d", node.RunningBuilds(), node.PeakBuilds())
	}
	var running int
	_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT count(*) FROM builds WHERE state = 'running'").Scan(&running)
	if running != 2 {
		t.Fatalf("%d running builds in the database", running)
	}
	for _, dep := range append([]Deployment{newer}, more...) {
		e.eventually("build ends", func() bool {
			for _, st := range node.BuildStatuses() {
				if st.DeploymentID == dep.ID.String() && st.State == build.StateRunning {
					return node.FinishBuild(st.ID, agenttest.BuildResult{Error: "done"}) == nil
				}
			}
			return false
		})
		e.waitDeployment(acme, dep.ID.String(), "failed")
	}
	if node.PeakBuilds() != 2 {
		t.Fatalf("peak %d builds on a node with 2 slots", node.PeakBuilds())
	}

	// One slot, three builds of each organisation queued (acme's first):
	// the slot alternates between them, oldest first within each.
	e.setBuildSlots(0)
	e.eventually("no build running", func() bool { return node.RunningBuilds() == 0 })
	var queued []Deployment
	for i := range 3 {
		queued = append(queued, deploy(acme, sha(10+i), fmt.Sprintf("f%d", i)))
	}
	for i := range 3 {
		queued = append(queued, deploy(other, sha(20+i), fmt.Sprintf("f%d", i)))
	}
	e.setBuildSlots(1)
	var order []string
	done := map[string]bool{}
	for len(order) < 6 {
		e.eventually("next build", func() bool {
			for _, st := range node.BuildStatuses() {
				if st.State == build.StateRunning && !done[st.ID] {
					spec, _ := specOf(e, st.ID)
					order = append(order, orgOf[spec.ProjectID])
					done[st.ID] = true
					return node.FinishBuild(st.ID, agenttest.BuildResult{Error: "done"}) == nil
				}
			}
			return false
		})
	}
	// acme's builds ran above, so other, served longest ago, goes first.
	if got := strings.Join(order, ","); got != "other,acme,other,acme,other,acme" {
		t.Fatalf("slot went to %s", got)
	}
	for _, q := range queued {
		tok := acme
		if orgOf[q.ProjectID.String()] == "other" {
			tok = other
		}
		if d := e.waitDeployment(tok, q.ID.String(), "failed"); d.FailureReason != "build failed: done" {
			t.Fatalf("%q", d.FailureReason)
		}
	}
}

// TestBuildNodeLost: a build its node forgets fails; a build whose node
// stops heartbeating fails with a reason naming the node, and is canceled
// there; deploying the commit again retries it.
func TestBuildNodeLost(t *testing.T) {
	t.Parallel()
	e, _ := newBuildEnv(t)
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	if code := e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "git_url": "https://git.example.com/acme/web.git", "min_instances_per_region": 1}, nil); code != 201 {
		t.Fatalf("create project: %d", code)
	}
	node := e.agents[0]
	e.setBuildSlots(1)
	var d Deployment
	// A build its node forgets (the agent restarted) fails.
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"commit_sha": strings.Repeat("e", 40)}, &d); code != 202 {
		t.Fatalf("deploy: %d", code)
	}
	e.eventually("build running", func() bool { return node.BuildState(d.Build.ID.String()) == build.StateRunning })
	node.ForgetBuild(d.Build.ID.String())
	if d = e.waitDeployment(tok, d.ID.String(), "failed"); !strings.Contains(d.FailureReason, "lost the build") || node.BuildCreatesOf(d.Build.ID.String()) != 1 {
		t.Fatalf("forgotten build: %q, %d creates", d.FailureReason, node.BuildCreatesOf(d.Build.ID.String()))
	}
	// A build whose node goes down fails.
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"commit_sha": strings.Repeat("f", 40)}, &d); code != 202 {
		t.Fatalf("deploy: %d", code)
	}
	e.eventually("build running", func() bool { return node.RunningBuilds() == 1 })
	if spec, _ := specOf(e, d.Build.ID.String()); spec.Source.GitURL != "https://git.example.com/acme/web.git" || spec.Source.GitToken != "" {
		t.Fatalf("spec source: %+v", spec.Source)
	}
	node.SetAlive(false)
	d = e.waitDeployment(tok, d.ID.String(), "failed")
	if !strings.Contains(d.FailureReason, "build failed: node h-"+node.ID[:8]) || !strings.Contains(d.FailureReason, "marked down") || d.Build.State != build.StateFailed {
		t.Fatalf("node lost: %q %+v", d.FailureReason, d.Build)
	}
	if st := node.BuildState(d.Build.ID.String()); st != build.StateCanceled {
		t.Fatalf("build on the lost node is %q", st)
	}
	// Deploying the commit again retries the build (elsewhere).
	e.agents[1].SetMaxBuilds(1)
	var retry Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"commit_sha": strings.Repeat("f", 40)}, &retry); code != 202 || retry.ID == d.ID {
		t.Fatalf("retry: %d %s", code, retry.ID)
	}
	e.eventually("retried build running on another node", func() bool { return e.agents[1].BuildState(retry.Build.ID.String()) == build.StateRunning })
	var again Deployment
	if e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"commit_sha": strings.Repeat("f", 40)}, &again); again.ID != retry.ID {
		t.Fatalf("a commit with a deployment under way got another: %s %s", retry.ID, again.ID)
	}
}

// TestBuildWithoutRegistry: with BUILD_REGISTRY unset a build fails its
// deployment with a reason that says so; image deployments still work.
func TestBuildWithoutRegistry(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	if code := e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "github_repo": "acme/web", "min_instances_per_region": 1}, nil); code != 201 {
		t.Fatalf("create project: %d", code)
	}
	e.setBuildSlots(1)
	var d Deployment
	e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"commit_sha": strings.Repeat("a", 40)}, &d)
	d = e.waitDeployment(tok, d.ID.String(), "failed", "active")
	if d.Status != "failed" || !strings.Contains(d.FailureReason, "BUILD_REGISTRY") {
		t.Fatalf("%s %q", d.Status, d.FailureReason)
	}
	e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v1"]}, &d)
	if d = e.waitDeployment(tok, d.ID.String(), "failed", "active"); d.Status != "active" || d.Build != nil {
		t.Fatalf("image deployment of a build project: %s %q", d.Status, d.FailureReason)
	}
}

func TestBuildConfig(t *testing.T) {
	base := map[string]string{"DATABASE_URL": "postgres://x", "CLUSTER_TOKEN": "t", "ENCRYPTION_KEY": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}
	l := envconfig.FromMap(base)
	c := LoadConfig(l)
	if err := l.Err(); err != nil || c.GitBaseURL != "https://github.com" || c.BuildRegistry != "" || c.BuildTimeout != 15*time.Minute || c.BuildVCPUs != 0 {
		t.Fatalf("defaults: %+v %v", c, err)
	}
	set := map[string]string{"BUILD_REGISTRY": "127.0.0.1:5005/zw/", "GIT_BASE_URL": "https://git.example.com/", "BUILD_TIMEOUT": "30m",
		"BUILD_VCPUS": "4", "BUILD_MEMORY_MIB": "4096", "BUILD_DISK_MIB": "20480"}
	for k, v := range base {
		set[k] = v
	}
	l = envconfig.FromMap(set)
	c = LoadConfig(l)
	if err := l.Err(); err != nil || c.BuildRegistry != "127.0.0.1:5005/zw" || c.GitBaseURL != "https://git.example.com" || c.BuildTimeout != 30*time.Minute ||
		c.BuildVCPUs != 4 || c.BuildMemoryMiB != 4096 || c.BuildDiskMiB != 20480 {
		t.Fatalf("set: %+v %v", c, err)
	}
	for k, v := range map[string]string{"BUILD_REGISTRY": "https://reg.example.com", "GIT_BASE_URL": "github.com", "BUILD_TIMEOUT": "5s",
		"BUILD_MEMORY_MIB": "100", "BUILD_VCPUS": "100"} {
		bad := map[string]string{k: v}
		for bk, bv := range base {
			bad[bk] = bv
		}
		l = envconfig.FromMap(bad)
		LoadConfig(l)
		if err := l.Err(); err == nil || !strings.Contains(err.Error(), k) {
			t.Errorf("%s=%s: %v", k, v, err)
		}
	}
}
