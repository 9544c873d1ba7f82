package gitsource

import (
	"bytes"
	"encoding/base64"
	"io"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

const httpBackend = "/usr/lib/git-core/git-http-backend"

// gitServer serves the bare repositories in root with git http-backend on
// loopback:
//
//	/<name>.git          smart HTTP, protocol v2: wants by commit id granted
//	/private/<name>.git  the same behind basic auth, user x-access-token and
//	                     password token (published in root/private)
//	/slow/...            never answers
type gitServer struct {
	*httptest.Server
	root     string
	token    string
	requests atomic.Int64
	// v0 makes the server speak protocol v0 only, which refuses wants by
	// commit id (no uploadpack.allowReachableSHA1InWant).
	v0 atomic.Bool
	// leaked counts requests during which the token was on some process's
	// command line.
	leaked atomic.Int64
}

func newGitServer(t *testing.T) *gitServer {
	t.Helper()
	if _, err := os.Stat(httpBackend); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("git http-backend is needed on CI (make deps installs git): %v", err)
		}
		t.Skipf("git http-backend: %v", err)
	}
	s := &gitServer{root: t.TempDir(), token: "tok-3f9c2a7e51d8b4e0-secret"}
	backend := &cgi.Handler{
		Path:   httpBackend,
		Env:    []string{"GIT_PROJECT_ROOT=" + s.root, "GIT_HTTP_EXPORT_ALL=1", "GIT_CONFIG_NOSYSTEM=1"},
		Stderr: io.Discard,
	}
	wantAuth := "Basic " + base64.StdEncoding.EncodeToString([]byte("x-access-token:"+s.token))
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		if s.v0.Load() {
			r.Header.Del("Git-Protocol")
		}
		switch {
		case strings.HasPrefix(r.URL.Path, "/private/"):
			if onCommandLine(s.token) {
				s.leaked.Add(1)
			}
			if r.Header.Get("Authorization") != wantAuth {
				w.Header().Set("WWW-Authenticate", `Basic realm="git"`)
				http.Error(w, "unauthorized", http.StatusUnauthorized)
				return
			}
		case strings.HasPrefix(r.URL.Path, "/slow/"):
			<-r.Context().Done()
			return
		}
		backend.ServeHTTP(w, r)
	}))
	t.Cleanup(s.Close)
	return s
}

// onCommandLine reports whether s is in the command line of any process.
func onCommandLine(s string) bool {
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range cmdlines {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(s)) {
			return true
		}
	}
	return false
}

// testRepo is a repository made by a test, with its commits.
type testRepo struct {
	work    string
	commits []string
}

// gitT runs git for a test, with no user or system config.
func gitT(t *testing.T, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + dir,
		"LC_ALL=C",
		"GIT_CONFIG_NOSYSTEM=1",
		"GIT_CONFIG_GLOBAL=/dev/null",
		"GIT_AUTHOR_NAME=Test", "GIT_AUTHOR_EMAIL=test@example.com",
		"GIT_COMMITTER_NAME=Test", "GIT_COMMITTER_EMAIL=test@example.com",
		"GIT_AUTHOR_DATE=2025-01-02T03:04:05Z", "GIT_COMMITTER_DATE=2025-01-02T03:04:05Z",
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// newTestRepo makes a repository of three commits on main:
//
//	1: README.md, src/main.go, run.sh (executable), link -> README.md
//	2: README.md changed, src/main.go gone, src/lib/util.go, notes.txt
//	   marked export-ignore in .gitattributes
//	3: CHANGELOG added
//
// objectFormat is "sha1" or "sha256".
func newTestRepo(t *testing.T, objectFormat string) *testRepo {
	t.Helper()
	work := t.TempDir()
	gitT(t, work, "init", "--quiet", "--object-format="+objectFormat, "--initial-branch=main", ".")
	write := func(name, content string, mode os.FileMode) {
		p := filepath.Join(work, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	r := &testRepo{work: work}
	commit := func(msg string) {
		gitT(t, work, "add", "--all")
		gitT(t, work, "commit", "--quiet", "-m", msg)
		r.commits = append(r.commits, gitT(t, work, "rev-parse", "HEAD"))
	}

	write("README.md", "version 1\n", 0o644)
	write("src/main.go", "package main\n", 0o644)
	write("run.sh", "#!/bin/sh\necho hi\n", 0o755)
	if err := os.Symlink("README.md", filepath.Join(work, "link")); err != nil {
		t.Fatal(err)
	}
	commit("one")

	write("README.md", "version 2\n", 0o644)
	if err := os.Remove(filepath.Join(work, "src/main.go")); err != nil {
		t.Fatal(err)
	}
	write("src/lib/util.go", "package lib\n", 0o644)
	write(".gitattributes", "notes.txt export-ignore\n", 0o644)
	write("notes.txt", "kept\n", 0o644)
	commit("two")

	write("CHANGELOG", "three\n", 0o644)
	commit("three")
	return r
}

// publish makes a bare copy of the repository at root/name.git.
func (r *testRepo) publish(t *testing.T, root, name string) string {
	t.Helper()
	dst := filepath.Join(root, name+".git")
	gitT(t, r.work, "clone", "--quiet", "--bare", r.work, dst)
	return dst
}
