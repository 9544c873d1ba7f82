// Package webhook authenticates and decodes GitHub webhook deliveries: the
// X-Hub-Signature-256 HMAC is checked in constant time before anything is
// parsed, and push payloads are reduced to what a deployment needs.
package webhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
)

// ZeroSHA is the "after" of a branch deletion.
const ZeroSHA = "0000000000000000000000000000000000000000"

// Push is the part of GitHub's push payload Zeitwork uses.
type Push struct {
	Ref        string `json:"ref"`
	After      string `json:"after"`
	Deleted    bool   `json:"deleted"`
	Repository struct {
		FullName string `json:"full_name"`
	} `json:"repository"`
	// HeadCommit is null for a branch deletion and for some tag pushes.
	HeadCommit *struct {
		Message string `json:"message"`
	} `json:"head_commit"`
}

// MaxMessage bounds a stored commit message, in characters.
const MaxMessage = 1000

// CommitMessage is the head commit's message, bounded (Message), or "".
func (p *Push) CommitMessage() string {
	if p.HeadCommit == nil {
		return ""
	}
	return Message(p.HeadCommit.Message)
}

// Message makes a commit message storable: valid UTF-8 without NUL bytes
// (PostgreSQL text rejects them), at most MaxMessage characters.
func Message(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.ReplaceAll(s, "\x00", "")
	n := 0
	for i := range s {
		if n == MaxMessage {
			return s[:i]
		}
		n++
	}
	return s
}

// Branch is the pushed branch, or "" for tags and other refs.
func (p *Push) Branch() string {
	b, ok := strings.CutPrefix(p.Ref, "refs/heads/")
	if !ok {
		return ""
	}
	return b
}

// Deploys reports whether the push creates a deployment: a branch that
// was updated or created, not deleted.
func (p *Push) Deploys() bool {
	return !p.Deleted && p.After != ZeroSHA && p.Branch() != ""
}

// Sign returns the X-Hub-Signature-256 value of body under secret.
func Sign(secret string, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// Verify checks an X-Hub-Signature-256 header ("sha256=<hex HMAC>") in
// constant time. An empty secret verifies nothing.
func Verify(secret, header string, body []byte) bool {
	sig, ok := strings.CutPrefix(header, "sha256=")
	if !ok || secret == "" {
		return false
	}
	got, err := hex.DecodeString(sig)
	if err != nil {
		return false
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return hmac.Equal(got, mac.Sum(nil))
}

// ParsePush decodes and validates a push payload.
func ParsePush(body []byte) (*Push, error) {
	var ev Push
	if err := json.Unmarshal(body, &ev); err != nil {
		return nil, fmt.Errorf("malformed push payload: %w", err)
	}
	if ev.Repository.FullName == "" || !strings.HasPrefix(ev.Ref, "refs/") {
		return nil, fmt.Errorf("push payload lacks repository.full_name or ref")
	}
	if ev.After != ZeroSHA && !ValidSHA(ev.After) {
		return nil, fmt.Errorf("push payload has a bad after %q", ev.After)
	}
	return &ev, nil
}

// ValidSHA reports whether s looks like a (possibly abbreviated) lower-case
// hex commit id: 7 to 64 characters.
func ValidSHA(s string) bool {
	if len(s) < 7 || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
