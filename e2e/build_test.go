package e2e

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/devcluster"
	"github.com/zeitwork/zeitwork/internal/ocitest"
)

// gitServer serves bare repositories over smart HTTP with git's own
// http-backend, on loopback.
type gitServer struct {
	t    *testing.T
	root string
	url  string
}

// privateToken opens the repositories under /private/ (GitHub's style of
// HTTPS token: basic auth as x-access-token).
const privateToken = "ghs_e2eprivatetoken"

func startGitServer(t *testing.T) *gitServer {
	root := t.TempDir()
	h := &cgi.Handler{Path: "/usr/lib/git-core/git-http-backend",
		Env: []string{"GIT_PROJECT_ROOT=" + root, "GIT_HTTP_EXPORT_ALL=1"}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/private/") {
			if u, p, ok := r.BasicAuth(); !ok || u != "x-access-token" || p != privateToken {
				w.Header().Set("WWW-Authenticate", `Basic realm="git"`)
				http.Error(w, "authentication required", http.StatusUnauthorized)
				return
			}
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return &gitServer{t: t, root: root, url: srv.URL}
}

// repo is a working copy whose commits are pushed to the server.
type repo struct {
	t    *testing.T
	dir  string
	bare string
}

func (g *gitServer) repo(name string) *repo {
	r := &repo{t: g.t, dir: g.t.TempDir(), bare: filepath.Join(g.root, name+".git")}
	r.git(g.root, "init", "-q", "--bare", r.bare)
	r.git(r.bare, "config", "http.receivepack", "true")
	r.git(r.dir, "init", "-q", "-b", "main")
	r.git(r.dir, "remote", "add", "origin", r.bare)
	return r
}

func (r *repo) git(dir string, args ...string) string {
	r.t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=dev", "GIT_AUTHOR_EMAIL=dev@zeitwork.test",
		"GIT_COMMITTER_NAME=dev", "GIT_COMMITTER_EMAIL=dev@zeitwork.test", "GIT_CONFIG_NOSYSTEM=1", "HOME="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		r.t.Fatalf("git %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// commit writes files, commits and pushes; it returns the commit id.
func (r *repo) commit(msg string, files map[string]string) string {
	for name, content := range files {
		p := filepath.Join(r.dir, name)
		_ = os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			r.t.Fatal(err)
		}
	}
	r.git(r.dir, "add", "-A")
	r.git(r.dir, "commit", "-q", "-m", msg)
	r.git(r.dir, "push", "-q", "origin", "main")
	return r.git(r.dir, "rev-parse", "HEAD")
}

// pushHook sends a signed GitHub push delivery for sha.
func (s *suite) pushHook(repoName, sha, delivery string) {
	s.t.Helper()
	payload := []byte(fmt.Sprintf(`{"ref":"refs/heads/main","after":"%s","deleted":false,"repository":{"full_name":"%s"},"head_commit":{"id":"%s","message":"e2e"}}`, sha, repoName, sha))
	mac := hmac.New(sha256.New, []byte(s.c.WebhookSecret))
	mac.Write(payload)
	req, _ := http.NewRequest("POST", s.c.OperatorURL+"/api/v1/github/webhook", bytes.NewReader(payload))
	req.Header.Set("X-GitHub-Event", "push")
	req.Header.Set("X-GitHub-Delivery", delivery)
	req.Header.Set("X-Hub-Signature-256", "sha256="+hex.EncodeToString(mac.Sum(nil)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 202 {
		s.t.Fatalf("webhook: %v %v", resp, err)
	}
	resp.Body.Close()
}

// deploymentOf waits until the project has a deployment of sha in one of
// the given states and returns it.
func (s *suite) deploymentOf(project, sha string, within time.Duration, states ...string) apiclient.Deployment {
	s.t.Helper()
	deadline := time.Now().Add(within)
	var last string
	for time.Now().Before(deadline) {
		code, out, _ := s.cli("deployments", "ls", "--project", project, "--json")
		var dl struct {
			Deployments []apiclient.Deployment `json:"deployments"`
		}
		if code == 0 && json.Unmarshal([]byte(out), &dl) == nil {
			for _, d := range dl.Deployments {
				if d.CommitSHA != sha {
					continue
				}
				last = d.Status
				for _, st := range states {
					if d.Status == st {
						return d
					}
				}
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	s.t.Fatalf("no deployment of %s reached %v within %s (last status %q)", sha, states, within, last)
	return apiclient.Deployment{}
}

const appDockerfile = `# A multi-stage build: the page is made in one stage, served from another.
FROM %[1]s AS page
ARG GREETING=hello
COPY . /src
RUN mkdir -p /out && echo "$GREETING from $(cat /src/version.txt)" > /out/index.html
%[2]s
FROM %[1]s
COPY --from=page /out /srv
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/srv"]
`

// isolationProbe is a RUN step that fails the build when the builder
// reaches any of targets ("name host port").
func isolationProbe(targets []string) string {
	var b strings.Builder
	b.WriteString("RUN GW=$(ip route | awk '/default/ {print $3}'); for t in")
	for _, t := range targets {
		fmt.Fprintf(&b, " %q", t)
	}
	b.WriteString(`; do set -- $t; h=$2; [ "$h" = gw ] && h=$GW; ` +
		`if nc -w 2 "$h" "$3" -e /bin/true 2>/dev/null; then echo "REACHED $1 at $h:$3"; exit 1; fi; ` +
		`echo "isolated from $1 ($h:$3)"; done`)
	return b.String()
}

// TestBuildFromSource is a customer's push-to-deploy story: a push
// webhook for a repository on a (local) git server builds its Dockerfile
// in a builder microVM, the image lands in the platform's distribution
// registry and serves through LB → edge → VM; a one-line change rebuilds
// warm; a broken Dockerfile fails its deployment and leaves production
// alone; and the builder reaches none of the platform's services or VMs.
func TestBuildFromSource(t *testing.T) {
	gs := startGitServer(t)
	s := startCluster(t, devcluster.Config{
		Distribution: true, GitBaseURL: gs.url,
		Env: map[string]string{"DEPLOY_TIMEOUT": "120s", "NODE_DOWN_AFTER": "60s"},
	})
	ctx := context.Background()
	base := s.c.Registry.Addr + "/base/busybox:1"
	ocitest.Push(ctx, t, base, ocitest.Busybox(t))
	// A service on every host address stands for whatever else runs on a
	// worker (agent, operator, database): builders must not reach it.
	hostLn, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	go http.Serve(hostLn, http.NotFoundHandler())
	t.Cleanup(func() { hostLn.Close() })
	hostPort := hostLn.Addr().(*net.TCPAddr).Port

	r := gs.repo("acme/web")
	files := map[string]string{
		"Dockerfile":    fmt.Sprintf(appDockerfile, base, isolationProbe([]string{fmt.Sprintf("host-service gw %d", hostPort), "node-agent gw 8081", "operator gw 8080", "postgres gw 5432"})),
		"version.txt":   "commit one",
		".dockerignore": "notes/\n",
		"notes/x.md":    "not in the image",
	}
	sha1 := r.commit("one", files)
	if code, out, errs := s.cli("projects", "create", "web", "--github-repo", "acme/web", "--port", "8080", "--health-path", "/",
		"--min-instances", "1"); code != 0 {
		t.Fatalf("projects create: %d %s %s", code, out, errs)
	}
	s.pushHook("acme/web", sha1, "build-1")
	d1 := s.deploymentOf("web", sha1, 8*time.Minute, "active", "failed")
	if d1.Status != "active" {
		t.Fatalf("first build: %s: %s", d1.Status, d1.FailureReason)
	}
	c := s.client(0, "")
	prodURL := "https://web-demo.zeitwork.test"
	s.waitBody(c, prodURL+"/", "hello from commit one", time.Minute)
	if !strings.HasPrefix(d1.Image, s.c.Registry.Addr+"/demo/web@sha256:") {
		t.Fatalf("deployed image %q is not the built one", d1.Image)
	}

	// The build is listed and its log kept with it.
	code, out, errs := s.cli("builds", "ls", "--project", "web", "--json")
	var bl struct {
		Builds []struct {
			ID        string `json:"id"`
			State     string `json:"state"`
			CommitSHA string `json:"commit_sha"`
			CacheHits int    `json:"cache_hits"`
		} `json:"builds"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &bl) != nil || len(bl.Builds) != 1 || bl.Builds[0].State != "succeeded" {
		t.Fatalf("builds ls: %d %s %s", code, out, errs)
	}
	code, logs, errs := s.cli("builds", "logs", bl.Builds[0].ID)
	if code != 0 || !strings.Contains(logs, "STEP 1/") || !strings.Contains(logs, "isolated from host-service") {
		t.Fatalf("builds logs: %d\n%s\n%s", code, logs, errs)
	}

	// A one-line change: a warm build (the layer cache answers the steps
	// before COPY), and the builder cannot reach the running app's VM.
	ip := s.instanceIP(t)
	files["version.txt"] = "commit two"
	files["Dockerfile"] = fmt.Sprintf(appDockerfile, base, isolationProbe([]string{fmt.Sprintf("host-service gw %d", hostPort), "app-vm " + ip + " 8080"}))
	sha2 := r.commit("two", files)
	s.pushHook("acme/web", sha2, "build-2")
	d2 := s.deploymentOf("web", sha2, 6*time.Minute, "active", "failed")
	if d2.Status != "active" {
		t.Fatalf("second build: %s: %s", d2.Status, d2.FailureReason)
	}
	s.waitBody(c, prodURL+"/", "hello from commit two", time.Minute)
	_, out, _ = s.cli("builds", "ls", "--project", "web", "--json")
	_ = json.Unmarshal([]byte(out), &bl)
	var warm string
	for _, b := range bl.Builds {
		if b.CommitSHA == sha2 {
			warm = b.ID
			if b.CacheHits < 1 {
				t.Errorf("the second build reused no step from the cache")
			}
		}
	}
	if _, logs, _ := s.cli("builds", "logs", warm); !strings.Contains(logs, "Using cache") || !strings.Contains(logs, "isolated from app-vm") {
		t.Fatalf("warm build log:\n%s", logs)
	}

	// A broken Dockerfile: the deployment fails with the builder's last
	// lines, and production keeps serving commit two.
	files["Dockerfile"] = fmt.Sprintf("FROM %s\nRUN echo compiling && echo 'error: missing semicolon' && exit 3\n", base)
	sha3 := r.commit("three", files)
	s.pushHook("acme/web", sha3, "build-3")
	d3 := s.deploymentOf("web", sha3, 6*time.Minute, "active", "failed")
	if d3.Status != "failed" || !strings.Contains(d3.FailureReason, "build failed") || !strings.Contains(d3.FailureReason, "missing semicolon") {
		t.Fatalf("broken build: %s: %q", d3.Status, d3.FailureReason)
	}
	if code, body, _ := get(c, prodURL+"/"); code != 200 || !strings.Contains(body, "commit two") {
		t.Fatalf("production after a failed build: %d %q", code, body)
	}
	// The working tree, uploaded: `zeitwork deploy --source DIR` follows
	// the build's log, then the phases.
	srcDir := t.TempDir()
	files["Dockerfile"] = fmt.Sprintf(appDockerfile, base, "")
	files["version.txt"] = "an uploaded tree"
	for n, content := range files {
		_ = os.MkdirAll(filepath.Dir(filepath.Join(srcDir, n)), 0o755)
		if err := os.WriteFile(filepath.Join(srcDir, n), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	code, out, errs = s.cli("deploy", "--project", "web", "--source", srcDir)
	if code != 0 || !strings.Contains(errs, "STEP 1/") {
		t.Fatalf("deploy --source: %d\n%s\n%s", code, out, errs)
	}
	s.waitBody(c, prodURL+"/", "hello from an uploaded tree", time.Minute)

	// A private repository: the token is stored sealed and used for the
	// fetch on the node, never inside the builder.
	pr := gs.repo("private/api")
	psha := pr.commit("private one", map[string]string{"Dockerfile": fmt.Sprintf(appDockerfile, base, ""), "version.txt": "a private repo"})
	cmd := exec.Command(filepath.Join(s.bin, "zeitwork"), "projects", "create", "api", "--git-url", gs.url+"/private/api.git",
		"--port", "8080", "--health-path", "/", "--min-instances", "1", "--git-token-stdin")
	cmd.Env = append(os.Environ(), "ZEITWORK_CONFIG="+s.cfg, "NO_COLOR=1")
	cmd.Stdin = strings.NewReader(privateToken + "\n")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("projects create api: %v\n%s", err, b)
	}
	if code, out, errs := s.cli("deploy", "--project", "api", "--commit", psha); code != 0 {
		t.Fatalf("deploy --commit of a private repository: %d\n%s\n%s", code, out, errs)
	}
	s.waitBody(c, "https://api-demo.zeitwork.test/", "hello from a private repo", time.Minute)
	if strings.Contains(s.allLogs(), privateToken) {
		t.Fatal("the git token appears in a service log")
	}

	// A commit that is not in the repository fails with that reason.
	s.pushHook("acme/web", strings.Repeat("ab", 20), "build-4")
	d4 := s.deploymentOf("web", strings.Repeat("ab", 20), 3*time.Minute, "active", "failed")
	if d4.Status != "failed" || !strings.Contains(d4.FailureReason, "not in repository") {
		t.Fatalf("unknown commit: %s: %q", d4.Status, d4.FailureReason)
	}
}

// allLogs is every service log of the cluster.
func (s *suite) allLogs() string {
	var b strings.Builder
	logs, _ := filepath.Glob(filepath.Join(s.c.StateDir(), "logs", "*.log"))
	for _, l := range logs {
		c, _ := os.ReadFile(l)
		b.Write(c)
	}
	return b.String()
}

// instanceIP is the VM address of a running instance on region 0's node,
// from the node agent's own API.
func (s *suite) instanceIP(t *testing.T) string {
	addr := strings.TrimSuffix(strings.TrimPrefix(s.c.Regions[0].NodeAgents[0].Health, "http://"), "/health/live")
	req, _ := http.NewRequest("GET", "http://"+addr+"/instances", nil)
	req.Header.Set("Authorization", "Bearer "+s.c.ClusterToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list []struct {
		IP    string `json:"ip"`
		State string `json:"state"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	for _, in := range list {
		if in.State == "running" && in.IP != "" {
			return in.IP
		}
	}
	t.Fatalf("no running instance on the node: %+v", list)
	return ""
}
