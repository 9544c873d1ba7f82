// Package gitsource produces the source tree of one commit of a git
// repository as a tar stream, for a builder microVM to build from.
//
// A Fetcher keeps one bare mirror per repository URL in its cache
// directory. Archive fetches exactly the wanted commit into the mirror
// (nothing when the mirror already has it) and writes `git archive` of
// that commit: the tree as committed, without a .git directory, without
// submodule contents, and with export-ignore and export-subst attributes
// ignored, so the build sees the files the commit holds.
//
// git runs with a scrubbed environment: no system or global config, an
// empty HOME, no prompts, hooks disabled, and only the https, http and ssh
// transports (plus local paths when AllowFile is set). A token travels
// as an HTTP header set through the environment, so it is not on a
// command line, not in the mirror, and not in any error.
package gitsource

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

// Defaults for a Fetcher's zero fields.
const (
	DefaultTimeout  = 10 * time.Minute
	DefaultMaxBytes = 2 << 30
)

// Error classes; test with errors.Is. Each error's message is written for
// the user whose build failed.
var (
	ErrInvalid        = errors.New("invalid repository URL or commit")
	ErrRepoNotFound   = errors.New("repository not found")
	ErrAccessDenied   = errors.New("access to repository denied")
	ErrCommitNotFound = errors.New("commit not found")
	ErrTooLarge       = errors.New("source archive too large")
)

// Fetcher archives commits of git repositories. Its methods may be called
// concurrently, also by several processes sharing CacheDir.
type Fetcher struct {
	// CacheDir holds the mirrors: <sha256 of the URL>.git, each with a
	// .lock file beside it. It is created if missing.
	CacheDir string
	// Timeout bounds one Archive call: waiting for the mirror's lock,
	// fetching and archiving. Zero means DefaultTimeout.
	Timeout time.Duration
	// MaxBytes bounds the tar stream written by Archive. Zero means
	// DefaultMaxBytes.
	MaxBytes int64
	// AllowFile admits local paths and file:// URLs as repositories. For
	// tests only: a user must not make the node read its own files.
	AllowFile bool
}

// Info describes an archive that Archive wrote.
type Info struct {
	CommitSHA string // the commit archived, lowercase hex
	Bytes     int64  // size of the tar stream
	CacheHit  bool   // the mirror had the commit before the call: no fetch
}

// Archive writes the tree of commit commitSHA of the repository at repoURL
// to w as a tar stream. token, if not empty, authenticates to an http(s)
// repository (a GitHub installation token, a personal access token). On
// error, w may have received part of a stream, which the caller discards.
func (f *Fetcher) Archive(ctx context.Context, repoURL, commitSHA, token string, w io.Writer) (Info, error) {
	sha, err := checkCommit(commitSHA)
	if err != nil {
		return Info{}, err
	}
	u, err := checkURL(repoURL, f.AllowFile)
	if err != nil {
		return Info{}, err
	}
	if token != "" && !u.http {
		return Info{}, &classified{ErrInvalid, fmt.Sprintf(
			"a token works only with an https:// repository URL, not with %s", u.raw)}
	}

	timeout := f.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeoutCause(ctx, timeout,
		fmt.Errorf("gave up after %s: %w", timeout, context.DeadlineExceeded))
	defer cancel()

	if err := os.MkdirAll(f.CacheDir, 0o700); err != nil {
		return Info{}, fmt.Errorf("cannot create git cache: %w", err)
	}
	home, err := os.MkdirTemp("", "gitsource-home-")
	if err != nil {
		return Info{}, fmt.Errorf("cannot create git home: %w", err)
	}
	defer os.RemoveAll(home)

	name := mirrorName(u.raw)
	r := &run{
		url:   u,
		token: token,
		dir:   filepath.Join(f.CacheDir, name+".git"),
		env:   gitEnv(home, token, f.AllowFile),
	}

	hit, err := r.fetch(ctx, filepath.Join(f.CacheDir, name+".lock"), sha)
	if err != nil {
		return Info{}, r.fail(ctx, "fetch", err)
	}

	limit := f.MaxBytes
	if limit <= 0 {
		limit = DefaultMaxBytes
	}
	lw := &limitWriter{w: w, max: limit}
	if err := r.git(ctx, lw, "archive", "--format=tar", sha+"^{commit}"); err != nil {
		if lw.over {
			return Info{}, &classified{ErrTooLarge, fmt.Sprintf(
				"the source of commit %s is larger than the limit of %s", sha, formatBytes(limit))}
		}
		if lw.err != nil {
			return Info{}, fmt.Errorf("cannot write archive of %s: %w", sha, lw.err)
		}
		return Info{}, r.fail(ctx, "archive", err)
	}
	return Info{CommitSHA: sha, Bytes: lw.n, CacheHit: hit}, nil
}

// fetch makes sure the mirror holds commit sha, under the mirror's lock.
// It reports whether the mirror had it already.
func (r *run) fetch(ctx context.Context, lockPath, sha string) (hit bool, err error) {
	unlock, err := lockFile(ctx, lockPath)
	if err != nil {
		return false, err
	}
	defer unlock()

	format := "sha1"
	if len(sha) == 64 {
		format = "sha256"
	}
	if err := r.initMirror(ctx, format); err != nil {
		return false, err
	}
	if r.hasCommit(ctx, sha) {
		return true, nil
	}

	// Ask for the commit alone; servers with protocol v2 or
	// uploadpack.allow{Reachable,Any}SHA1InWant grant it. The ref keeps it
	// reachable in the mirror.
	err = r.git(ctx, nil, "fetch", "--depth=1", "--no-tags", "--no-write-fetch-head",
		"--no-recurse-submodules", "--no-auto-maintenance", "--end-of-options",
		r.url.raw, "+"+sha+":refs/commits/"+sha)
	if err == nil && r.hasCommit(ctx, sha) {
		return false, nil
	}
	if err != nil && (classify(err) != nil || unreachable(err) || ctx.Err() != nil) {
		return false, err
	}

	// The server refused a want by id: fetch every branch and tag, with
	// full history, since the commit may be anywhere in it.
	args := []string{"fetch", "--no-tags", "--no-write-fetch-head",
		"--no-recurse-submodules", "--no-auto-maintenance"}
	if _, err := os.Stat(filepath.Join(r.dir, "shallow")); err == nil {
		// A have that is shallow here stands, for the server, for its
		// whole history: without --unshallow that history never comes.
		args = append(args, "--unshallow")
	}
	args = append(args, "--end-of-options", r.url.raw,
		"+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
	if err := r.git(ctx, nil, args...); err != nil {
		return false, err
	}
	if !r.hasCommit(ctx, sha) {
		return false, &classified{ErrCommitNotFound, fmt.Sprintf(
			"commit %s is not in repository %s", sha, r.url.raw)}
	}
	if err := r.git(ctx, nil, "update-ref", "refs/commits/"+sha, sha); err != nil {
		return false, err
	}
	return false, nil
}

// initMirror creates the bare mirror, for object ids of objectFormat
// (sha1, sha256), if it does not exist yet, through a
// temporary directory renamed into place, so that an interrupted init
// leaves nothing behind that looks like a mirror.
func (r *run) initMirror(ctx context.Context, objectFormat string) error {
	if _, err := os.Stat(filepath.Join(r.dir, "HEAD")); err == nil {
		return nil
	}
	_ = os.RemoveAll(r.dir)
	tmp, err := os.MkdirTemp(filepath.Dir(r.dir), ".init-*")
	if err != nil {
		return fmt.Errorf("cannot create mirror: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := r.gitIn(ctx, tmp, nil, "init", "--quiet", "--bare", "--template=",
		"--object-format="+objectFormat, tmp); err != nil {
		return err
	}
	// Attributes in the archived tree must not change what is archived:
	// info/attributes overrides them.
	if err := os.MkdirAll(filepath.Join(tmp, "info"), 0o755); err != nil {
		return fmt.Errorf("cannot create mirror: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "info", "attributes"),
		[]byte("* -export-ignore -export-subst\n"), 0o644); err != nil {
		return fmt.Errorf("cannot create mirror: %w", err)
	}
	if err := os.Rename(tmp, r.dir); err != nil {
		return fmt.Errorf("cannot create mirror: %w", err)
	}
	return nil
}

// hasCommit reports whether the mirror holds commit sha (and so its tree).
func (r *run) hasCommit(ctx context.Context, sha string) bool {
	return r.git(ctx, nil, "cat-file", "-e", sha+"^{commit}") == nil
}

// mirrorName is the name of the mirror of repository url in the cache:
// a hash, so that no URL can choose a path.
func mirrorName(url string) string {
	sum := sha256.Sum256([]byte(url))
	return hex.EncodeToString(sum[:])
}

// limitWriter passes at most max bytes to w and remembers whether more
// were offered, and w's own error.
type limitWriter struct {
	w    io.Writer
	max  int64
	n    int64
	over bool
	err  error
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if l.n+int64(len(p)) > l.max {
		l.over = true
		return 0, ErrTooLarge
	}
	n, err := l.w.Write(p)
	l.n += int64(n)
	if err != nil {
		l.err = err
	}
	return n, err
}

func formatBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}
