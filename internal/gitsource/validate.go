package gitsource

import (
	"fmt"
	"net/url"
	"path/filepath"
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"
)

// repoURL is a repository URL that git may be given as an argument.
type repoURL struct {
	raw  string // as given; safe to show, since it holds no password
	http bool   // http:// or https://, where a token can be sent
}

var (
	// helperRE is git's syntax for a remote helper, <transport>::<address>
	// (ext::sh -c …, fd::3): anything that runs a program.
	helperRE = regexp.MustCompile(`^[A-Za-z0-9+.-]+::`)
	// scpRE is the scp-like ssh syntax, [user@]host:path.
	scpRE = regexp.MustCompile(`^(?:[A-Za-z0-9_][A-Za-z0-9._~+-]*@)?[A-Za-z0-9][A-Za-z0-9.-]*:[^-]`)
)

// checkURL admits http(s)://, ssh:// and scp-like ssh URLs, and with
// allowFile also file:// URLs and absolute paths. It refuses anything git
// could take for an option or a remote helper, text with spaces or control
// characters, a host or user beginning with "-", and a password in the URL.
func checkURL(raw string, allowFile bool) (*repoURL, error) {
	bad := func(why string) error {
		return &classified{ErrInvalid, fmt.Sprintf("repository URL %q %s", raw, why)}
	}
	if raw == "" {
		return nil, &classified{ErrInvalid, "repository URL is empty"}
	}
	if len(raw) > 2048 {
		return nil, bad("is longer than 2048 bytes")
	}
	if !utf8.ValidString(raw) {
		return nil, bad("is not UTF-8")
	}
	for _, r := range raw {
		if r == ' ' || !unicode.IsPrint(r) {
			return nil, bad("contains a space or a control character")
		}
	}
	if strings.HasPrefix(raw, "-") {
		return nil, bad("begins with '-'")
	}
	if helperRE.MatchString(raw) {
		return nil, bad("names a git remote helper; give an https:// URL")
	}

	if scheme, _, ok := strings.Cut(raw, "://"); ok {
		u, err := url.Parse(raw)
		if err != nil {
			return nil, bad("does not parse")
		}
		switch scheme {
		case "https", "http", "ssh":
		case "file":
			if !allowFile {
				return nil, bad("is a local path; give an https:// URL")
			}
			return &repoURL{raw: raw}, nil
		default:
			return nil, bad("has scheme " + scheme + "; give an https:// URL")
		}
		if u.Scheme != scheme || u.Opaque != "" {
			return nil, bad("does not parse")
		}
		host := u.Hostname()
		if host == "" || strings.HasPrefix(host, "-") {
			return nil, bad("has no valid host")
		}
		if _, ok := u.User.Password(); ok {
			return nil, bad("contains a password; pass credentials as a token instead")
		}
		if name := u.User.Username(); strings.HasPrefix(name, "-") {
			return nil, bad("has a user name beginning with '-'")
		}
		return &repoURL{raw: raw, http: u.Scheme != "ssh"}, nil
	}

	// Without "://", git reads a local path when there is no ':' or a '/'
	// comes before the first ':', and [user@]host:path otherwise.
	colon, slash := strings.IndexByte(raw, ':'), strings.IndexByte(raw, '/')
	if colon < 0 || (slash >= 0 && slash < colon) {
		if !allowFile {
			return nil, bad("is a local path; give an https:// URL")
		}
		if !filepath.IsAbs(raw) {
			return nil, bad("is a relative path")
		}
		return &repoURL{raw: raw}, nil
	}
	if !scpRE.MatchString(raw) {
		return nil, bad("is neither a URL nor user@host:path")
	}
	return &repoURL{raw: raw}, nil
}

// checkCommit admits a full commit id, SHA-1 (40 hex digits) or SHA-256
// (64), and returns it in lowercase.
func checkCommit(sha string) (string, error) {
	if len(sha) != 40 && len(sha) != 64 {
		return "", &classified{ErrInvalid, fmt.Sprintf(
			"commit %q is not a full commit id: give all 40 (SHA-1) or 64 (SHA-256) hex digits", sha)}
	}
	for i := 0; i < len(sha); i++ {
		c := sha[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return "", &classified{ErrInvalid, fmt.Sprintf("commit %q is not hexadecimal", sha)}
		}
	}
	return strings.ToLower(sha), nil
}
