// Package names validates and builds the DNS names the platform hands out:
// project and organisation labels, customer domains, and the versioned and
// production hostnames of deployments.
package names

import (
	"crypto/rand"
	"fmt"
	"regexp"
	"strings"
)

var labelRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidLabel checks a project or organisation name: one DNS label,
// lower-case letters, digits and inner hyphens, at most 63 octets.
func ValidLabel(s string) error {
	if len(s) == 0 {
		return fmt.Errorf("name is empty")
	}
	if len(s) > 63 {
		return fmt.Errorf("name %q is longer than 63 characters", s)
	}
	if !labelRE.MatchString(s) {
		return fmt.Errorf("name %q must be lower-case letters, digits and inner hyphens (a DNS label)", s)
	}
	return nil
}

var domainRE = regexp.MustCompile(`^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$`)

// NormalizeDomain lower-cases a customer domain and validates it.
func NormalizeDomain(s string) (string, error) {
	d := strings.TrimSuffix(strings.ToLower(strings.TrimSpace(s)), ".")
	if len(d) > 253 || !domainRE.MatchString(d) {
		return "", fmt.Errorf("%q is not a valid domain name", s)
	}
	return d, nil
}

const nanoAlphabet = "0123456789abcdefghijklmnopqrstuvwxyz"

// NanoID returns 7 random characters from [0-9a-z].
func NanoID() string {
	var b [7]byte
	out := make([]byte, 7)
	for i := 0; i < 7; {
		_, _ = rand.Read(b[:])
		for _, c := range b {
			if i == 7 {
				break
			}
			if c < 252 { // 252 = 7*36: rejection sampling keeps it uniform
				out[i] = nanoAlphabet[c%36]
				i++
			}
		}
	}
	return string(out)
}

// VersionedLabel builds "<project>-<nanoid>-<org>" within 63 octets. When
// too long, the project name is shortened first, then the org name, each
// to no less than one character, and hyphens left at a cut are trimmed; the
// nanoid is always whole.
func VersionedLabel(project, nanoid, org string) string {
	const max = 63
	fixed := len(nanoid) + 2
	p, o := project, org
	if over := len(p) + len(o) + fixed - max; over > 0 {
		cut := min(over, len(p)-1)
		p = strings.TrimRight(p[:len(p)-cut], "-")
		over -= cut
		if over > 0 {
			o = strings.TrimRight(o[:len(o)-min(over, len(o)-1)], "-")
		}
	}
	return p + "-" + nanoid + "-" + o
}

// AliasLabel is the production alias "<project>-<org>", shortened the same
// way as VersionedLabel.
func AliasLabel(project, org string) string {
	if len(project)+len(org)+1 <= 63 {
		return project + "-" + org
	}
	cut := len(project) + len(org) + 1 - 63
	p := strings.TrimRight(project[:len(project)-min(cut, len(project)-1)], "-")
	return p + "-" + org[:min(len(org), 63-len(p)-1)]
}
