package gitsource

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// run is one Archive call's view of git: the repository, its mirror and
// the environment every git process gets.
type run struct {
	url   *repoURL
	token string
	dir   string // the mirror
	env   []string
}

// gitEnv is the whole environment of a git process: nothing is inherited
// but PATH and the proxy settings, so no GIT_DIR, GIT_SSH_COMMAND or
// trace variable of the agent's environment reaches git.
func gitEnv(home, token string, allowFile bool) []string {
	protocols := "https:http:ssh"
	if allowFile {
		protocols += ":file"
	}
	env := []string{
		"HOME=" + home, // no ~/.gitconfig, no ~/.netrc
		"LC_ALL=C",     // messages in English, for classify
		"GIT_CONFIG_NOSYSTEM=1",
		"GIT_CONFIG_GLOBAL=/dev/null",
		"GIT_TERMINAL_PROMPT=0",
		"GIT_ASKPASS=/bin/true",
		"SSH_ASKPASS=/bin/true",
		"GIT_SSH_COMMAND=ssh -o BatchMode=yes",
		"GIT_ALLOW_PROTOCOL=" + protocols,
	}
	for _, k := range []string{"PATH", "http_proxy", "https_proxy", "no_proxy",
		"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "all_proxy",
		"SSL_CERT_FILE", "SSL_CERT_DIR"} {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	if _, ok := os.LookupEnv("PATH"); !ok {
		env = append(env, "PATH=/usr/local/bin:/usr/bin:/bin")
	}
	config := [][2]string{
		{"core.hooksPath", "/dev/null"},
		{"core.fsmonitor", "false"},
		{"gc.auto", "0"},
		{"maintenance.auto", "false"},
		{"fetch.recurseSubmodules", "false"},
		{"submodule.recurse", "false"},
		{"credential.helper", ""},
		{"http.followRedirects", "initial"},
	}
	if token != "" {
		// x-access-token is the user name GitHub expects with an
		// installation token; GitLab and Gitea accept any user name.
		auth := base64.StdEncoding.EncodeToString([]byte("x-access-token:" + token))
		config = append(config, [2]string{"http.extraHeader", "Authorization: Basic " + auth})
	}
	env = append(env, "GIT_CONFIG_COUNT="+strconv.Itoa(len(config)))
	for i, kv := range config {
		n := strconv.Itoa(i)
		env = append(env, "GIT_CONFIG_KEY_"+n+"="+kv[0], "GIT_CONFIG_VALUE_"+n+"="+kv[1])
	}
	return env
}

// git runs git on the mirror.
func (r *run) git(ctx context.Context, stdout io.Writer, args ...string) error {
	return r.gitIn(ctx, r.dir, stdout, args...)
}

// gitIn runs git with gitDir as its repository. git and every process it
// starts (git-remote-https, ssh) share a process group, killed as a whole
// when ctx ends.
func (r *run) gitIn(ctx context.Context, gitDir string, stdout io.Writer, args ...string) error {
	cmd := exec.CommandContext(ctx, "git", append([]string{"--git-dir=" + gitDir}, args...)...)
	cmd.Dir = gitDir
	cmd.Env = r.env
	cmd.Stdout = stdout
	stderr := &tailBuffer{max: 8 << 10}
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return &gitError{cmd: args[0], err: err, stderr: r.redact(stderr.String())}
	}
	return nil
}

// redact removes the token, in every form git could show it, from s.
func (r *run) redact(s string) string {
	if r.token == "" {
		return s
	}
	auth := base64.StdEncoding.EncodeToString([]byte("x-access-token:" + r.token))
	return strings.NewReplacer(auth, "[redacted]", r.token, "[redacted]").Replace(s)
}

// fail turns the error of step ("fetch", "archive") into the error Archive
// returns: classified when git's output says what went wrong, the
// context's cause when the call ran out of time, else git's last lines.
func (r *run) fail(ctx context.Context, step string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("cannot %s %s: %w", step, r.url.raw, context.Cause(ctx))
	}
	var c *classified
	if errors.As(err, &c) {
		return c
	}
	switch classify(err) {
	case ErrRepoNotFound:
		return &classified{ErrRepoNotFound, fmt.Sprintf(
			"repository %s does not exist or is not visible with the given credentials", r.url.raw)}
	case ErrAccessDenied:
		if !r.url.http {
			return &classified{ErrAccessDenied, fmt.Sprintf(
				"access to repository %s was denied", r.url.raw)}
		}
		if r.token == "" {
			return &classified{ErrAccessDenied, fmt.Sprintf(
				"repository %s needs credentials: give a token with read access to it", r.url.raw)}
		}
		return &classified{ErrAccessDenied, fmt.Sprintf(
			"the token was refused for repository %s: it is wrong, expired, or lacks read access", r.url.raw)}
	}
	return fmt.Errorf("cannot %s %s: %w", step, r.url.raw, err)
}

// classify reads git's output for a missing repository or refused
// credentials, over any transport.
func classify(err error) error {
	var g *gitError
	if !errors.As(err, &g) {
		return nil
	}
	s := g.stderr
	has := func(subs ...string) bool {
		for _, sub := range subs {
			if strings.Contains(s, sub) {
				return true
			}
		}
		return false
	}
	switch {
	case has("Authentication failed", "could not read Username", "could not read Password",
		"terminal prompts disabled", "returned error: 401", "returned error: 403",
		"Permission denied (publickey"):
		return ErrAccessDenied
	case has("' not found", "Repository not found", "does not appear to be a git repository",
		"returned error: 404", "No such repository", "repository not found"):
		return ErrRepoNotFound
	}
	return nil
}

// unreachable reports whether git could not talk to the server at all,
// so that asking again in another way is pointless.
func unreachable(err error) bool {
	var g *gitError
	if !errors.As(err, &g) {
		return false
	}
	for _, sub := range []string{"unable to access '", "Could not resolve host",
		"ssh: connect to host", "Connection refused", "Connection timed out"} {
		if strings.Contains(g.stderr, sub) {
			return true
		}
	}
	return false
}

// classified is an error of one class with a message for the user.
type classified struct {
	class error
	msg   string
}

func (c *classified) Error() string { return c.msg }
func (c *classified) Unwrap() error { return c.class }

// gitError is a failed git command with the last lines it wrote to stderr,
// token redacted.
type gitError struct {
	cmd    string
	err    error
	stderr string
}

func (g *gitError) Error() string {
	lines := strings.Split(strings.TrimSpace(g.stderr), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	tail := strings.TrimSpace(strings.Join(lines, "\n"))
	if tail == "" {
		return fmt.Sprintf("git %s: %v", g.cmd, g.err)
	}
	return fmt.Sprintf("git %s: %v: %s", g.cmd, g.err, tail)
}

func (g *gitError) Unwrap() error { return g.err }

// tailBuffer keeps the last max bytes written to it, at least.
type tailBuffer struct {
	max int
	buf bytes.Buffer
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.buf.Write(p)
	if t.buf.Len() > 2*t.max {
		b := t.buf.Bytes()[t.buf.Len()-t.max:]
		t.buf.Reset()
		t.buf.Write(b)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return t.buf.String() }

// lockFile takes an exclusive flock on path, waiting until ctx ends. flock
// locks belong to an open file, so goroutines of one process exclude each
// other as processes do.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cannot open mirror lock: %w", err)
	}
	wait := 10 * time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, fmt.Errorf("cannot lock mirror: %w", err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("cannot lock mirror: %w", context.Cause(ctx))
		case <-time.After(wait):
		}
		wait = min(2*wait, 250*time.Millisecond)
	}
}
