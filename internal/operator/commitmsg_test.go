package operator

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/zeitwork/zeitwork/internal/pgtest"
)

// lightEnv is an operator without agents or a registry: enough for
// documents that need no running instances.
func lightEnv(t *testing.T) *env {
	e := &env{t: t, cfg: testConfig(pgtest.URL(t))}
	op, url := startOperator(t, e.cfg)
	e.ops, e.url = []*Operator{op}, url
	return e
}

// TestCommitMessage: a deployment keeps the commit message of its API
// request or of the GitHub push, bounded to 1000 characters.
func TestCommitMessage(t *testing.T) {
	t.Parallel()
	e := lightEnv(t)
	tok, err := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	if err != nil {
		t.Fatal(err)
	}
	if code := e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "github_repo": "acme/web", "github_branch": "main",
		"image_template": "registry.test/acme/web:{sha}"}, nil); code != 201 {
		t.Fatalf("create project: %d", code)
	}
	var plain, long Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": "registry.test/acme/web:v1"}, &plain); code != 202 || plain.CommitMessage != "" {
		t.Fatalf("deploy without a message: %d %+v", code, plain)
	}
	msg := "Fix <b>it</b>\n\n" + strings.Repeat("é", 1200)
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": "registry.test/acme/web:v2",
		"commit_sha": "abcdef1", "commit_message": msg + "\x00"}, &long); code != 202 {
		t.Fatalf("deploy with a message: %d", code)
	}
	if utf8.RuneCountInString(long.CommitMessage) != 1000 || !strings.HasPrefix(long.CommitMessage, "Fix <b>it</b>\n\n") {
		t.Fatalf("stored message: %d characters %.40q", utf8.RuneCountInString(long.CommitMessage), long.CommitMessage)
	}
	var got Deployment
	if e.call(tok, "GET", "/api/v1/deployments/"+long.ID.String(), nil, &got); got.CommitMessage != long.CommitMessage {
		t.Fatal("GET lost the commit message")
	}
	// The database bounds it too.
	var n int
	if err := e.ops[0].pool.QueryRow(t.Context(), "SELECT max(char_length(commit_message)) FROM deployments").Scan(&n); err != nil || n != 1000 {
		t.Fatalf("longest stored message: %d %v", n, err)
	}

	payload, err := os.ReadFile("testdata/push.json")
	if err != nil {
		t.Fatal(err)
	}
	sha := "abc1234abc1234abc1234abc1234abc1234abc12"
	payload = bytes.ReplaceAll(bytes.ReplaceAll(payload, []byte("REPO"), []byte("acme/web")), []byte("AFTER"), []byte(sha))
	if code := e.call("", "POST", "/api/v1/github/webhook", string(payload), nil, "X-GitHub-Event", "push", "X-GitHub-Delivery", "d-msg",
		"X-Hub-Signature-256", sign(payload)); code/100 != 2 {
		t.Fatalf("webhook: %d", code)
	}
	var id uuid.UUID
	if err := e.ops[0].pool.QueryRow(t.Context(), "SELECT id FROM deployments WHERE commit_sha = $1", sha).Scan(&id); err != nil {
		t.Fatal(err)
	}
	if e.call(tok, "GET", "/api/v1/deployments/"+id.String(), nil, &got); got.CommitMessage != "Update README.md" {
		t.Fatalf("pushed deployment's message: %q", got.CommitMessage)
	}
}
