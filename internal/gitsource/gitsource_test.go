package gitsource

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func newFetcher(t *testing.T) *Fetcher {
	return &Fetcher{CacheDir: t.TempDir(), Timeout: time.Minute}
}

// file is an entry of an archive: a regular file or a symlink.
type file struct {
	content string
	exec    bool
	link    string // symlink target
}

// readTar reads an archive back, failing on anything but regular files,
// symlinks and directories, and on a .git entry.
func readTar(t *testing.T, b []byte) map[string]file {
	t.Helper()
	files := map[string]file{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatalf("read archive: %v", err)
		}
		name := strings.TrimSuffix(h.Name, "/")
		if name == ".git" || strings.HasPrefix(name, ".git/") {
			t.Errorf("archive has %s", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeXGlobalHeader, tar.TypeDir:
		case tar.TypeReg:
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[name] = file{content: string(data), exec: h.Mode&0o111 != 0}
		case tar.TypeSymlink:
			files[name] = file{link: h.Linkname}
		default:
			t.Errorf("archive entry %s has type %c", h.Name, h.Typeflag)
		}
	}
}

func wantTree(commit int) map[string]file {
	m := map[string]file{
		"README.md":   {content: "version 1\n"},
		"src/main.go": {content: "package main\n"},
		"run.sh":      {content: "#!/bin/sh\necho hi\n", exec: true},
		"link":        {link: "README.md"},
	}
	if commit >= 2 {
		m["README.md"] = file{content: "version 2\n"}
		delete(m, "src/main.go")
		m["src/lib/util.go"] = file{content: "package lib\n"}
		m[".gitattributes"] = file{content: "notes.txt export-ignore\n"}
		m["notes.txt"] = file{content: "kept\n"} // export-ignore is ignored
	}
	if commit >= 3 {
		m["CHANGELOG"] = file{content: "three\n"}
	}
	return m
}

func checkTree(t *testing.T, b []byte, commit int) {
	t.Helper()
	got, want := readTar(t, b), wantTree(commit)
	if !maps.Equal(got, want) {
		t.Errorf("archive of commit %d:\n got %v\nwant %v", commit, got, want)
	}
}

func archive(t *testing.T, f *Fetcher, url, sha, token string) (Info, []byte, error) {
	t.Helper()
	var buf bytes.Buffer
	info, err := f.Archive(t.Context(), url, sha, token, &buf)
	return info, buf.Bytes(), err
}

func TestArchiveContents(t *testing.T) {
	srv := newGitServer(t)
	repo := newTestRepo(t, "sha1")
	repo.publish(t, srv.root, "app")
	f := newFetcher(t)
	// Commit 2 first, then its parent: the mirror is shallow by then.
	for _, n := range []int{2, 1, 3} {
		info, b, err := archive(t, f, srv.URL+"/app.git", repo.commits[n-1], "")
		if err != nil {
			t.Fatalf("commit %d: %v", n, err)
		}
		if info.CommitSHA != repo.commits[n-1] || info.Bytes != int64(len(b)) || info.CacheHit {
			t.Errorf("commit %d: info %+v, archive of %d bytes", n, info, len(b))
		}
		checkTree(t, b, n)
	}
}

func TestArchiveCacheHit(t *testing.T) {
	srv := newGitServer(t)
	repo := newTestRepo(t, "sha1")
	repo.publish(t, srv.root, "app")
	f := newFetcher(t)
	sha := strings.ToUpper(repo.commits[1]) // ids are case-insensitive
	first, b1, err := archive(t, f, srv.URL+"/app.git", sha, "")
	if err != nil {
		t.Fatal(err)
	}
	before := srv.requests.Load()
	second, b2, err := archive(t, f, srv.URL+"/app.git", sha, "")
	if err != nil {
		t.Fatal(err)
	}
	if first.CacheHit || !second.CacheHit {
		t.Errorf("cache hit: first %v, second %v", first.CacheHit, second.CacheHit)
	}
	if n := srv.requests.Load() - before; n != 0 {
		t.Errorf("second archive of the same commit made %d requests", n)
	}
	if second.CommitSHA != repo.commits[1] {
		t.Errorf("CommitSHA %q, want %q", second.CommitSHA, repo.commits[1])
	}
	if !bytes.Equal(b1, b2) {
		t.Error("two archives of one commit differ")
	}
}

// TestArchiveWithoutWantsByID covers servers that refuse to send a commit
// by its id (protocol v0 without uploadpack.allowReachableSHA1InWant):
// the fetcher falls back to all branches and tags, also into a mirror that
// earlier fetches by id left shallow.
func TestArchiveWithoutWantsByID(t *testing.T) {
	srv := newGitServer(t)
	repo := newTestRepo(t, "sha1")
	repo.publish(t, srv.root, "app")
	url := srv.URL + "/app.git"

	srv.v0.Store(true)
	if _, b, err := archive(t, newFetcher(t), url, repo.commits[0], ""); err != nil {
		t.Fatal(err)
	} else {
		checkTree(t, b, 1)
	}

	srv.v0.Store(false)
	f := newFetcher(t)
	if _, _, err := archive(t, f, url, repo.commits[2], ""); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(f.CacheDir, mirrorName(url)+".git", "shallow")); err != nil {
		t.Fatalf("mirror is not shallow after a fetch by id: %v", err)
	}
	srv.v0.Store(true)
	info, b, err := archive(t, f, url, repo.commits[1], "")
	if err != nil {
		t.Fatal(err)
	}
	if info.CacheHit {
		t.Error("cache hit for a commit behind the shallow boundary")
	}
	checkTree(t, b, 2)
}

func TestArchiveCommitNotFound(t *testing.T) {
	srv := newGitServer(t)
	repo := newTestRepo(t, "sha1")
	repo.publish(t, srv.root, "app")
	const missing = "0123456789abcdef0123456789abcdef01234567"
	for _, v0 := range []bool{false, true} {
		t.Run(map[bool]string{false: "v2", true: "v0"}[v0], func(t *testing.T) {
			srv.v0.Store(v0)
			url := srv.URL + "/app.git"
			_, _, err := archive(t, newFetcher(t), url, missing, "")
			if !errors.Is(err, ErrCommitNotFound) {
				t.Fatalf("error %v, want ErrCommitNotFound", err)
			}
			if want := "commit " + missing + " is not in repository " + url; err.Error() != want {
				t.Errorf("error %q, want %q", err, want)
			}
		})
	}
}

func TestArchiveRepoNotFound(t *testing.T) {
	srv := newGitServer(t)
	url := srv.URL + "/missing.git"
	_, _, err := archive(t, newFetcher(t), url, strings.Repeat("a", 40), "")
	if !errors.Is(err, ErrRepoNotFound) {
		t.Fatalf("error %v, want ErrRepoNotFound", err)
	}
	if want := "repository " + url + " does not exist or is not visible with the given credentials"; err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
}

func TestArchivePrivateRepo(t *testing.T) {
	srv := newGitServer(t)
	repo := newTestRepo(t, "sha1")
	repo.publish(t, filepath.Join(srv.root, "private"), "app")
	url := srv.URL + "/private/app.git"
	f := newFetcher(t)

	for _, token := range []string{"", "wrong-token"} {
		_, _, err := archive(t, f, url, repo.commits[0], token)
		if !errors.Is(err, ErrAccessDenied) {
			t.Fatalf("token %q: error %v, want ErrAccessDenied", token, err)
		}
		if !strings.Contains(err.Error(), url) {
			t.Errorf("token %q: error %q does not name the repository", token, err)
		}
		if token != "" && strings.Contains(err.Error(), token) {
			t.Errorf("error %q shows the token", err)
		}
	}

	info, b, err := archive(t, f, url, repo.commits[0], srv.token)
	if err != nil {
		t.Fatal(err)
	}
	checkTree(t, b, 1)
	if info.CacheHit {
		t.Error("cache hit on the first successful fetch")
	}
	// The mirror has the commit now; a wrong token does not matter.
	if _, _, err := archive(t, f, url, repo.commits[0], "wrong-token"); err != nil {
		t.Errorf("cached commit with another token: %v", err)
	}
	// A missing commit: the error names neither token nor its header.
	_, _, err = archive(t, f, url, strings.Repeat("b", 40), srv.token)
	if !errors.Is(err, ErrCommitNotFound) {
		t.Errorf("error %v, want ErrCommitNotFound", err)
	}

	if n := srv.leaked.Load(); n != 0 {
		t.Errorf("token on a command line during %d requests", n)
	}
	secrets := []string{srv.token, base64.StdEncoding.EncodeToString([]byte("x-access-token:" + srv.token))}
	for _, s := range secrets {
		if err != nil && strings.Contains(err.Error(), s) {
			t.Errorf("error %q shows the token", err)
		}
	}
	// Nothing in the cache holds the token: not the mirror's config, not
	// FETCH_HEAD, not a log.
	err = filepath.WalkDir(f.CacheDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, s := range secrets {
			if bytes.Contains(data, []byte(s)) {
				t.Errorf("%s holds the token", path)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(f.CacheDir, mirrorName(url)+".git", "config")); err != nil {
		t.Errorf("mirror config: %v", err)
	}
}

func TestArchiveTooLarge(t *testing.T) {
	srv := newGitServer(t)
	repo := newTestRepo(t, "sha1")
	repo.publish(t, srv.root, "app")
	f := newFetcher(t)
	f.MaxBytes = 4 << 10 // a tar stream is at least 10 KiB
	info, b, err := archive(t, f, srv.URL+"/app.git", repo.commits[0], "")
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("error %v, want ErrTooLarge", err)
	}
	if !strings.Contains(err.Error(), "4 KiB") {
		t.Errorf("error %q does not name the limit", err)
	}
	if len(b) > 4<<10 || info != (Info{}) {
		t.Errorf("%d bytes written, info %+v", len(b), info)
	}
	f.MaxBytes = 1 << 20
	if _, b, err := archive(t, f, srv.URL+"/app.git", repo.commits[0], ""); err != nil {
		t.Errorf("under the limit: %v", err)
	} else {
		checkTree(t, b, 1)
	}
}

// TestArchiveConcurrent runs builds of one repository at once: the lock
// lets one fetch each commit and the others find it in the mirror.
func TestArchiveConcurrent(t *testing.T) {
	srv := newGitServer(t)
	repo := newTestRepo(t, "sha1")
	repo.publish(t, srv.root, "app")
	cache := t.TempDir()
	const n = 6
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		misses = map[int]int{}
	)
	for i := range n {
		commit := i%2 + 1
		wg.Go(func() {
			// A Fetcher each, as separate processes would have.
			f := &Fetcher{CacheDir: cache, Timeout: time.Minute}
			info, b, err := archive(t, f, srv.URL+"/app.git", repo.commits[commit-1], "")
			if err != nil {
				t.Errorf("archive %d: %v", i, err)
				return
			}
			checkTree(t, b, commit)
			mu.Lock()
			defer mu.Unlock()
			if !info.CacheHit {
				misses[commit]++
			}
		})
	}
	wg.Wait()
	if misses[1] != 1 || misses[2] != 1 {
		t.Errorf("fetches per commit: %v, want one each", misses)
	}
}

func TestArchiveRefusesHostileInput(t *testing.T) {
	srv := newGitServer(t)
	sha := strings.Repeat("c", 40)
	pwned := filepath.Join(t.TempDir(), "pwned")
	cases := []struct{ url, sha, token string }{
		{url: "-oProxyCommand=touch " + pwned, sha: sha},
		{url: "--upload-pack=touch " + pwned, sha: sha},
		{url: "ext::sh -c touch% " + pwned, sha: sha},
		{url: "ext::sh", sha: sha},
		{url: "fd::3", sha: sha},
		{url: "ssh://-oProxyCommand=touch/repo", sha: sha},
		{url: "-host:repo", sha: sha},
		{url: "git@-oProxyCommand=x:repo", sha: sha},
		{url: "host:-repo", sha: sha},
		{url: srv.URL + "/app.git\n", sha: sha},
		{url: srv.URL + "/a pp.git", sha: sha},
		{url: srv.URL + "/app.git\x00", sha: sha},
		{url: "https://user:pass@example.com/app.git", sha: sha},
		{url: "git://example.com/app.git", sha: sha},
		{url: "ftp://example.com/app.git", sha: sha},
		{url: "HTTPS://example.com/app.git", sha: sha},
		{url: "file:///etc", sha: sha},
		{url: "/etc", sha: sha},
		{url: "relative/path", sha: sha},
		{url: "", sha: sha},
		{url: "git@example.com:app.git", sha: sha, token: "t"}, // a token needs http(s)
		{url: srv.URL + "/app.git", sha: "HEAD"},
		{url: srv.URL + "/app.git", sha: "--output=" + pwned},
		{url: srv.URL + "/app.git", sha: strings.Repeat("c", 39)},
		{url: srv.URL + "/app.git", sha: strings.Repeat("c", 41)},
		{url: srv.URL + "/app.git", sha: strings.Repeat("g", 40)},
		{url: srv.URL + "/app.git", sha: sha[:39] + "^"},
	}
	f := newFetcher(t)
	for _, c := range cases {
		_, _, err := archive(t, f, c.url, c.sha, c.token)
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("Archive(%q, %q): error %v, want ErrInvalid", c.url, c.sha, err)
		}
	}
	if _, err := os.Stat(pwned); err == nil {
		t.Error("a hostile URL ran a command")
	}
	if n := srv.requests.Load(); n != 0 {
		t.Errorf("%d requests to the server", n)
	}
	if entries, _ := os.ReadDir(f.CacheDir); len(entries) != 0 {
		t.Errorf("cache has %d entries", len(entries))
	}
}

func TestArchiveTimeout(t *testing.T) {
	srv := newGitServer(t)
	f := newFetcher(t)
	f.Timeout = 300 * time.Millisecond
	start := time.Now()
	_, _, err := archive(t, f, srv.URL+"/slow/app.git", strings.Repeat("d", 40), "")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("returned after %v", d)
	}
}

func TestArchiveLocalPath(t *testing.T) {
	repo := newTestRepo(t, "sha1")
	bare := repo.publish(t, t.TempDir(), "app")
	for _, url := range []string{bare, "file://" + bare} {
		if _, _, err := archive(t, newFetcher(t), url, repo.commits[0], ""); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s without AllowFile: error %v, want ErrInvalid", url, err)
		}
		f := newFetcher(t)
		f.AllowFile = true
		_, b, err := archive(t, f, url, repo.commits[1], "")
		if err != nil {
			t.Fatalf("%s: %v", url, err)
		}
		checkTree(t, b, 2)
	}
}

func TestArchiveSHA256(t *testing.T) {
	srv := newGitServer(t)
	repo := newTestRepo(t, "sha256")
	repo.publish(t, srv.root, "app")
	f := newFetcher(t)
	for _, n := range []int{1, 3} {
		info, b, err := archive(t, f, srv.URL+"/app.git", repo.commits[n-1], "")
		if err != nil {
			t.Fatalf("commit %d: %v", n, err)
		}
		if len(info.CommitSHA) != 64 {
			t.Errorf("CommitSHA %q", info.CommitSHA)
		}
		checkTree(t, b, n)
	}
}

// TestMirrorPerURL checks that two URLs get two mirrors and one URL one.
func TestMirrorPerURL(t *testing.T) {
	srv := newGitServer(t)
	repo := newTestRepo(t, "sha1")
	repo.publish(t, srv.root, "a")
	repo.publish(t, srv.root, "b")
	f := newFetcher(t)
	for _, name := range []string{"a", "b", "a"} {
		if _, _, err := archive(t, f, srv.URL+"/"+name+".git", repo.commits[0], ""); err != nil {
			t.Fatal(err)
		}
	}
	entries, err := os.ReadDir(f.CacheDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	want := []string{mirrorName(srv.URL + "/a.git"), mirrorName(srv.URL + "/b.git")}
	want = []string{want[0] + ".git", want[0] + ".lock", want[1] + ".git", want[1] + ".lock"}
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Errorf("cache holds %v, want %v", names, want)
	}
}
