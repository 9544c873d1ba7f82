package operator

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/zeitwork/zeitwork/internal/cli"
	"github.com/zeitwork/zeitwork/internal/httpjson"
	"github.com/zeitwork/zeitwork/internal/operator/agents/agenttest"
)

// TestNodeRemove: DELETE /api/v1/nodes/{id} removes a drained node that
// runs nothing, refuses (409, saying why) a ready node or one that still
// runs instances, and takes a lost node with the rows of its stopped
// instances. A removed node stays gone while its agent still heartbeats.
func TestNodeRemove(t *testing.T) {
	e := newEnv(t)
	tok, _ := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	other, _ := e.ops[0].Bootstrap(t.Context(), "other", "dev@other.test", "t")
	e.call(tok, "POST", "/api/v1/projects", map[string]any{"name": "web", "image_template": e.reg + "/acme/web:{sha}",
		"min_instances_per_region": 1, "health_path": "/healthz"}, nil)
	var d Deployment
	if code := e.call(tok, "POST", "/api/v1/projects/web/deployments", map[string]any{"image": e.images["v1"]}, &d); code != 202 {
		t.Fatalf("deploy: %d", code)
	}
	d = e.waitDeployment(tok, d.ID.String(), "active")
	// busy runs the region's one instance; idle is its peer.
	var busy, idle *agenttest.Agent
	for _, in := range d.Instances {
		if in.Desired == "running" {
			busy = e.agentOf(in.NodeID)
			break
		}
	}
	for _, a := range e.agents {
		if a.Region == busy.Region && a != busy {
			idle = a
		}
	}
	del := func(token, id string) (int, string) {
		var body httpjson.ErrorBody
		code := e.call(token, "DELETE", "/api/v1/nodes/"+id, nil, &body)
		return code, body.Error.Message
	}
	expect := func(what string, gotCode int, msg string, wantCode int, wantMsg string) {
		t.Helper()
		if gotCode != wantCode || !strings.Contains(msg, wantMsg) {
			t.Fatalf("%s: %d %q, want %d with %q", what, gotCode, msg, wantCode, wantMsg)
		}
	}
	code, msg := del(other, idle.ID)
	expect("removal by a non-admin organisation", code, msg, 403, "ADMIN_ORGS")
	code, msg = del(tok, uuid.NewString())
	expect("removal of an unknown node", code, msg, 404, "not found")
	code, msg = del(tok, "not-a-uuid")
	expect("removal of a malformed id", code, msg, 404, "not found")
	code, msg = del(tok, idle.ID)
	expect("removal of a ready node", code, msg, 409, "drain it first")

	// The idle peer drained and removed with the CLI: nothing on it, so
	// it goes.
	t.Setenv("ZEITWORK_CONFIG", filepath.Join(t.TempDir(), "cli.json"))
	t.Setenv("ZEITWORK_TOKEN", "")
	t.Setenv("ZEITWORK_API_URL", "")
	zw := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := cli.Main(append([]string{"--api-url", e.url, "--token", clusterToken}, args...), strings.NewReader(""), &out, &errb)
		return code, out.String(), errb.String()
	}
	if code, out, errs := zw("nodes", "rm", idle.ID); code == 0 || !strings.Contains(errs, "drain it first") {
		t.Fatalf("zeitwork nodes rm of a ready node: %d %q %q", code, out, errs)
	}
	if code, out, errs := zw("nodes", "drain", idle.ID); code != 0 || out != "node "+idle.ID+" draining\n" {
		t.Fatalf("zeitwork nodes drain: %d %q %q", code, out, errs)
	}
	if code, out, errs := zw("nodes", "rm", idle.ID); code != 0 || out != "node "+idle.ID+" removed\n" {
		t.Fatalf("zeitwork nodes rm: %d %q %q", code, out, errs)
	}
	code, msg = del(tok, idle.ID)
	expect("second removal", code, msg, 404, "not found")
	if code := e.call(tok, "POST", "/api/v1/nodes/"+idle.ID+"/enable", nil, nil); code != 404 {
		t.Fatalf("enable of a removed node: %d", code)
	}
	listed := func(id string) bool {
		var out struct {
			Nodes []struct {
				ID string `json:"id"`
			} `json:"nodes"`
		}
		e.call(tok, "GET", "/api/v1/nodes", nil, &out)
		for _, n := range out.Nodes {
			if n.ID == id {
				return true
			}
		}
		return false
	}
	time.Sleep(time.Second) // the removed node's agent keeps heartbeating
	if listed(idle.ID) {
		t.Fatal("a removed node is listed again after its heartbeats")
	}

	// The busy node drained: its instance has nowhere to go in its region
	// (the only peer is gone), so it stays and the node cannot be removed.
	if code := e.call(tok, "POST", "/api/v1/nodes/"+busy.ID+"/drain", nil, nil); code != 200 {
		t.Fatalf("drain: %d", code)
	}
	// A placement that read the node as ready before the drain committed
	// inserts nothing onto it.
	var regionID uuid.UUID
	if err := e.ops[0].pool.QueryRow(t.Context(), "SELECT region_id FROM nodes WHERE id = $1", busy.ID).Scan(&regionID); err != nil {
		t.Fatal(err)
	}
	tag, err := e.ops[0].pool.Exec(t.Context(), Q("InstanceInsert"), uuid.Must(uuid.NewV7()), d.ID, busy.ID, regionID, 1, 128)
	if err != nil || tag.RowsAffected() != 0 {
		t.Fatalf("instance inserted on a draining node: %v %v", tag, err)
	}
	code, msg = del(tok, busy.ID)
	expect("removal of a drained node that still runs an instance", code, msg, 409, "still runs 1 instances")

	// The node is lost: its instance stops counting, and the node can be
	// removed with that instance's row.
	busy.SetAlive(false)
	e.eventually("the lost node removable", func() bool {
		code, _ := del(tok, busy.ID)
		return code == 200
	})
	var left int
	_ = e.ops[0].pool.QueryRow(t.Context(), "SELECT count(*) FROM instances WHERE node_id = $1 AND deleted_at IS NULL", busy.ID).Scan(&left)
	if left != 0 || listed(busy.ID) {
		t.Fatalf("after removing a lost node: %d instance rows left, listed %v", left, listed(busy.ID))
	}
}
