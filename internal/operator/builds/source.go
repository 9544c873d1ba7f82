package builds

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
)

// GitTokenName is the additional-data name a project's git token is
// sealed under (with the project id); environment variable names cannot
// contain '-', so it never matches one.
const GitTokenName = "git-token"

var (
	fullSHA = regexp.MustCompile(`^([0-9a-f]{40}|[0-9a-f]{64})$`)
	scpLike = regexp.MustCompile(`^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s:][^\s]*$`)
)

// FullSHA reports whether s is a full hex commit id (SHA-1 or SHA-256),
// which a build needs: abbreviations are ambiguous.
func FullSHA(s string) bool { return fullSHA.MatchString(s) }

// RepoURL is where a build clones from: the project's git_url, else
// base + "/" + repo + ".git" (base is GIT_BASE_URL, e.g. https://github.com).
func RepoURL(base, githubRepo, gitURL string) string {
	if gitURL != "" {
		return gitURL
	}
	if githubRepo == "" {
		return ""
	}
	return strings.TrimRight(base, "/") + "/" + githubRepo + ".git"
}

// Tag is the image tag of a build: the commit, or "src-" and the first 12
// hex digits of an uploaded archive's SHA-256.
func Tag(commitSHA, sourceSHA256 string) string {
	if commitSHA != "" {
		return commitSHA
	}
	return "src-" + sourceSHA256[:min(12, len(sourceSHA256))]
}

// TargetImage is where a build pushes: <registry>/<org>/<project>:<tag>,
// or "" without a registry.
func TargetImage(registry, org, project, tag string) string {
	if registry == "" {
		return ""
	}
	return strings.TrimRight(registry, "/") + "/" + org + "/" + project + ":" + tag
}

// ValidGitURL checks a project's git_url: https, http, ssh or git URLs
// with a host, or the scp-like user@host:path form. Credentials belong in
// the git token, not the URL, and transports that run commands or read
// the builder's own files (ext::, file://, local paths) are refused.
func ValidGitURL(s string) error {
	if s == "" {
		return nil
	}
	if len(s) > 2048 {
		return errors.New("git_url is longer than 2048 characters")
	}
	if strings.HasPrefix(s, "-") || strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return fmt.Errorf("git_url %q must not start with '-' or contain spaces or control characters", s)
	}
	if !strings.Contains(s, "://") {
		if scpLike.MatchString(s) {
			return nil
		}
		return fmt.Errorf("git_url %q is not a URL (https://host/owner/repo.git) or user@host:path", s)
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("git_url %q: %v", s, err)
	}
	switch u.Scheme {
	case "https", "http", "ssh", "git":
	default:
		return fmt.Errorf("git_url %q: scheme %q is not allowed (https, http, ssh or git)", s, u.Scheme)
	}
	if u.Host == "" || strings.HasPrefix(u.Host, "-") {
		return fmt.Errorf("git_url %q has no host", s)
	}
	if _, hasPassword := u.User.Password(); hasPassword || (u.User != nil && (u.Scheme == "https" || u.Scheme == "http")) {
		return fmt.Errorf("git_url must not carry credentials; set git_token instead")
	}
	return nil
}
