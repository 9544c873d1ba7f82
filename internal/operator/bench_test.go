package operator

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/operator/routes"
	"github.com/zeitwork/zeitwork/internal/operator/webhook"
)

// BenchmarkWebhookPush measures how long GitHub waits for an answer to a
// signed push that creates a deployment (go test -bench WebhookPush).
func BenchmarkWebhookPush(b *testing.B) {
	e := newEnv(b)
	tok, _ := e.ops[0].Bootstrap(b.Context(), "acme", "ops@acme.test", "t")
	e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "github_repo": "acme/web", "image_template": e.reg + "/acme/web:{sha}"}, nil)
	tmpl, err := os.ReadFile("testdata/push.json")
	if err != nil {
		b.Fatal(err)
	}
	tmpl = []byte(strings.ReplaceAll(string(tmpl), "REPO", "acme/web"))
	b.ResetTimer()
	for i := range b.N {
		sha := fmt.Sprintf("%040x", i+1)
		body := []byte(strings.ReplaceAll(string(tmpl), "AFTER", sha))
		if code := e.call("", "POST", "/api/v1/github/webhook", string(body), nil, "X-GitHub-Event", "push",
			"X-GitHub-Delivery", sha, "X-Hub-Signature-256", webhook.Sign("whsec", body)); code != 202 {
			b.Fatalf("webhook: %d", code)
		}
	}
}

// BenchmarkAliasSwitch measures promote/rollback until an edge's long
// poll on the route table returns the new target (go test -bench
// AliasSwitch): the "routing switched within 1 s" figure.
func BenchmarkAliasSwitch(b *testing.B) {
	e := newEnv(b)
	tok, _ := e.ops[0].Bootstrap(b.Context(), "acme", "ops@acme.test", "t")
	e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "min_instances_per_region": 1}, nil)
	var ids []string
	for _, v := range []string{"v1", "v2"} {
		var d Deployment
		e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images[v]}, &d)
		ids = append(ids, e.waitDeployment(tok, d.ID.String(), "active").ID.String())
	}
	alias := "web-acme.zeitwork.test"
	var total time.Duration
	b.ResetTimer()
	for i := range b.N {
		target := ids[i%2]
		var cur routes.Table
		e.call(clusterToken, "GET", "/api/v1/routes", nil, &cur)
		got := make(chan routes.Table, 1)
		go func() {
			var rt routes.Table
			req, _ := http.NewRequest("GET", e.url+"/api/v1/routes?wait=30s&version="+cur.Version, nil)
			req.Header.Set("Authorization", "Bearer "+clusterToken)
			if resp, err := http.DefaultClient.Do(req); err == nil {
				_ = json.NewDecoder(resp.Body).Decode(&rt)
				resp.Body.Close()
			}
			got <- rt
		}()
		time.Sleep(5 * time.Millisecond) // let the poll reach the operator
		start := time.Now()
		if code := e.call(tok, "POST", "/api/v1/deployments/"+target+"/promote", nil, nil); code != 200 {
			b.Fatalf("promote: %d", code)
		}
		rt := <-got
		total += time.Since(start)
		found := false
		for _, r := range rt.Routes {
			found = found || (r.Host == alias && r.DeploymentID.String() == target)
		}
		if !found {
			b.Fatalf("long poll returned without the switch")
		}
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/switch")
}
