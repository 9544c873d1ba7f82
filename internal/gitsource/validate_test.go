package gitsource

import (
	"errors"
	"strings"
	"testing"
	"unicode"
)

func TestCheckURL(t *testing.T) {
	cases := []struct {
		url       string
		allowFile bool
		ok        bool
		http      bool
	}{
		{url: "https://github.com/zeitwork/zeitwork.git", ok: true, http: true},
		{url: "https://github.com/zeitwork/zeitwork", ok: true, http: true},
		{url: "http://127.0.0.1:8080/app.git", ok: true, http: true},
		{url: "https://x-access-token@github.com/o/r.git", ok: true, http: true},
		{url: "https://[::1]:8443/o/r.git", ok: true, http: true},
		{url: "ssh://git@github.com/o/r.git", ok: true},
		{url: "ssh://git@github.com:2222/o/r.git", ok: true},
		{url: "git@github.com:o/r.git", ok: true},
		{url: "github.com:o/r.git", ok: true},
		{url: "file:///srv/r.git", allowFile: true, ok: true},
		{url: "/srv/r.git", allowFile: true, ok: true},

		{url: ""},
		{url: "-oProxyCommand=touch /tmp/x"},
		{url: "--upload-pack=x"},
		{url: "ext::sh -c x"},
		{url: "ext::sh"},
		{url: "fd::0"},
		{url: "https::example.com/r"},
		{url: "ssh://-oProxyCommand=x/r"},
		{url: "ssh://-x@host/r"},
		{url: "ssh://host:-1/r"},
		{url: "-host:r"},
		{url: "-@host:r"},
		{url: "host:-r"},
		{url: "host::r"},
		{url: "https://example.com/r\n"},
		{url: "https://example.com/r\r"},
		{url: "https://example.com/r\t"},
		{url: "https://example.com/a b"},
		{url: "https://example.com/r\x7f"},
		{url: "https://example.com/r\u2028"},
		{url: "https://example.com/\xff"},
		{url: "https://user:pw@example.com/r"},
		{url: "https://user:@example.com/r"},
		{url: "https:///r"},
		{url: "HTTPS://example.com/r"},
		{url: "git://example.com/r"},
		{url: "ftp://example.com/r"},
		{url: "git+ssh://example.com/r"},
		{url: "file:///srv/r.git"},
		{url: "/srv/r.git"},
		{url: "srv/r.git"},
		{url: "./r:x"},
		{url: "r.git", allowFile: true},
		{url: "[::1]:r"},
		{url: "https://example.com/" + strings.Repeat("a", 2048)},
	}
	for _, c := range cases {
		u, err := checkURL(c.url, c.allowFile)
		if c.ok {
			if err != nil {
				t.Errorf("checkURL(%q, %v): %v", c.url, c.allowFile, err)
			} else if u.raw != c.url || u.http != c.http {
				t.Errorf("checkURL(%q) = %+v", c.url, u)
			}
			continue
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("checkURL(%q, %v): error %v, want ErrInvalid", c.url, c.allowFile, err)
		}
	}
}

func TestCheckCommit(t *testing.T) {
	sha1 := "0123456789abcdef0123456789abcdef01234567"
	sha256 := sha1 + "0123456789abcdef01234567"
	for in, want := range map[string]string{
		sha1:                  sha1,
		strings.ToUpper(sha1): sha1,
		sha256:                sha256,
	} {
		if got, err := checkCommit(in); err != nil || got != want {
			t.Errorf("checkCommit(%q) = %q, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "HEAD", "main", sha1[:7], sha1[:39], sha1 + "0",
		sha1[:39] + "g", sha1[:39] + "^", "-" + sha1[1:], sha256[:63], sha256 + "0"} {
		if _, err := checkCommit(in); !errors.Is(err, ErrInvalid) {
			t.Errorf("checkCommit(%q): error %v, want ErrInvalid", in, err)
		}
	}
}

// FuzzCheck checks what an accepted URL or commit can be: nothing git
// could read as an option, a remote helper or a second argument, and no
// local path unless allowed.
func FuzzCheck(f *testing.F) {
	for _, s := range []string{
		"https://github.com/o/r.git", "git@github.com:o/r.git", "ssh://h/r",
		"-oProxyCommand=x", "ext::sh", "file:///r", "/r", "h:-r", "https://u:p@h/r",
		"0123456789abcdef0123456789abcdef01234567",
	} {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, s string, allowFile bool) {
		if u, err := checkURL(s, allowFile); err == nil {
			if u.raw != s {
				t.Fatalf("checkURL(%q) changed it to %q", s, u.raw)
			}
			if strings.HasPrefix(s, "-") || helperRE.MatchString(s) {
				t.Fatalf("checkURL accepted %q", s)
			}
			for _, r := range s {
				if r == ' ' || !unicode.IsPrint(r) {
					t.Fatalf("checkURL accepted %q with %q", s, r)
				}
			}
			remote := strings.HasPrefix(s, "https://") || strings.HasPrefix(s, "http://") ||
				strings.HasPrefix(s, "ssh://") || scpRE.MatchString(s)
			if !allowFile && !remote {
				t.Fatalf("checkURL accepted %q, which is not a remote URL", s)
			}
			if u.http != (strings.HasPrefix(s, "https://") || strings.HasPrefix(s, "http://")) {
				t.Fatalf("checkURL(%q).http = %v", s, u.http)
			}
			if host, ok := strings.CutPrefix(s, "ssh://"); ok {
				if _, after, ok := strings.Cut(host, "@"); ok {
					host = after
				}
				if strings.HasPrefix(host, "-") {
					t.Fatalf("checkURL accepted %q with host beginning '-'", s)
				}
			}
		} else if !errors.Is(err, ErrInvalid) {
			t.Fatalf("checkURL(%q): error %v does not wrap ErrInvalid", s, err)
		}

		sha, err := checkCommit(s)
		valid := (len(s) == 40 || len(s) == 64) && strings.Trim(strings.ToLower(s), "0123456789abcdef") == ""
		if valid != (err == nil) {
			t.Fatalf("checkCommit(%q) = %q, %v", s, sha, err)
		}
		if err == nil && sha != strings.ToLower(s) {
			t.Fatalf("checkCommit(%q) = %q", s, sha)
		}
	})
}
