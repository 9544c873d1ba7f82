package console_test

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// TestCommitMessageShown: a deployment shows its commit message's first
// line next to the SHA, escaped.
func TestCommitMessageShown(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u := e.user()
	u.signIn(acmeToken)
	if resp, _ := u.post("/projects", url.Values{"name": {"web"}, "min_instances": {"1"}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("create project: %d", resp.StatusCode)
	}
	body, _ := json.Marshal(map[string]string{"image": e.images["v1"], "commit_sha": "abcdef0123456",
		"commit_message": "Fix <script>alert(1)</script> & more\n\nThe second paragraph"})
	req, _ := http.NewRequest("POST", e.url+"/api/v1/projects/web/deployments", strings.NewReader(string(body)))
	req.Header.Set("Authorization", "Bearer "+acmeToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("deploy: %d", resp.StatusCode)
	}
	_, page := u.get("/projects/web/deployments")
	want := `abcdef012345 <span class="commit-msg">Fix &lt;script&gt;alert(1)&lt;/script&gt; &amp; more</span>`
	if !strings.Contains(page, want) || strings.Contains(page, "second paragraph") || strings.Contains(page, "<script>alert") {
		t.Fatalf("no escaped first line of the commit message: %s", page)
	}
}
