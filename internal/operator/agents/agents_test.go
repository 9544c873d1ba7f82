package agents_test

import (
	"bufio"
	"strings"
	"testing"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/operator/agents"
	"github.com/zeitwork/zeitwork/internal/operator/agents/agenttest"
)

func TestClient(t *testing.T) {
	a := agenttest.Start(t, "r1", "http://127.0.0.1:1", "tok", func(image string) bool { return strings.Contains(image, "bad") })
	c := agents.New("tok")
	ctx := t.Context()
	spec := agents.Spec{ID: "i1", DeploymentID: "d1", Image: "reg/app@sha256:00", Port: 8080, VCPUs: 1, MemoryMiB: 128, HealthPath: "/"}
	for range 2 { // idempotent on the id
		if err := c.Create(ctx, a.URL(), spec); err != nil {
			t.Fatal(err)
		}
	}
	spec.ID, spec.Image = "i2", "reg/bad@sha256:00"
	if err := c.Create(ctx, a.URL(), spec); err != nil {
		t.Fatal(err)
	}
	list, err := c.List(ctx, a.URL())
	if err != nil || len(list) != 2 || a.CreatesOf("i1") != 2 {
		t.Fatalf("list %+v %v", list, err)
	}
	for _, in := range list {
		if in.Healthy != (in.ID == "i1") {
			t.Fatalf("health of %+v", in)
		}
	}
	logs, err := c.Logs(ctx, a.URL(), "i1", false)
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(logs)
	if !sc.Scan() || !strings.Contains(sc.Text(), `"line":"hello from i1"`) {
		t.Fatalf("logs: %q", sc.Text())
	}
	logs.Close()
	if _, err := c.Logs(ctx, a.URL(), "nope", false); err == nil {
		t.Fatal("logs of an unknown instance")
	}
	if err := c.Delete(ctx, a.URL(), "i1"); err != nil || a.Has("i1") {
		t.Fatalf("delete: %v", err)
	}
	if err := c.Delete(ctx, a.URL(), "i1"); err != nil {
		t.Fatalf("deleting twice: %v", err)
	}
	if err := agents.New("wrong").Create(ctx, a.URL(), spec); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("wrong token: %v", err)
	}
	if err := c.Create(ctx, a.URL(), agents.Spec{}); err == nil || !strings.Contains(err.Error(), "400") {
		t.Fatalf("empty spec: %v", err)
	}
	if _, err := c.List(ctx, "http://127.0.0.1:1"); err == nil {
		t.Fatal("list of an unreachable agent")
	}
}

func TestBuildCalls(t *testing.T) {
	a := agenttest.Start(t, "r1", "http://127.0.0.1:1", "tok", func(string) bool { return false })
	a.SetMaxBuilds(1)
	c := agents.New("tok")
	ctx := t.Context()
	spec := build.Spec{ID: "b1", DeploymentID: "d1", ProjectID: "p1", Image: "127.0.0.1:5005/acme/web:" + strings.Repeat("a", 40), TimeoutS: 60,
		Source: build.Source{GitURL: "https://github.com/acme/web.git", CommitSHA: strings.Repeat("a", 40)}}
	for range 2 { // idempotent on the id
		if err := c.CreateBuild(ctx, a.URL(), spec); err != nil {
			t.Fatal(err)
		}
	}
	if st, err := c.GetBuild(ctx, a.URL(), "b1"); err != nil || st.State != build.StateRunning || a.BuildCreatesOf("b1") != 2 {
		t.Fatalf("get: %+v %v", st, err)
	}
	if _, err := c.GetBuild(ctx, a.URL(), "nope"); !agents.IsNotFound(err) {
		t.Fatalf("unknown build: %v", err)
	}
	bad := spec
	bad.ID, bad.Image = "b2", "not an image"
	if err := c.CreateBuild(ctx, a.URL(), bad); !agents.IsRejected(err) {
		t.Fatalf("invalid spec: %v", err)
	}
	if err := a.Log("b1", "one", "two"); err != nil {
		t.Fatal(err)
	}
	body, err := c.BuildLogs(ctx, a.URL(), "b1", false, 2)
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(body)
	var lines []string
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	body.Close()
	if len(lines) != 1 || !strings.Contains(lines[0], `"seq":3`) || !strings.Contains(lines[0], `"line":"two"`) {
		t.Fatalf("logs since 2: %q", lines)
	}
	if err := c.DeleteBuild(ctx, a.URL(), "b1"); err == nil {
		t.Fatal("deleted a running build")
	}
	if err := c.CancelBuild(ctx, a.URL(), "b1"); err != nil || a.BuildState("b1") != build.StateCanceled {
		t.Fatalf("cancel: %v %s", err, a.BuildState("b1"))
	}
	if err := c.DeleteBuild(ctx, a.URL(), "b1"); err != nil || a.BuildState("b1") != "" {
		t.Fatalf("delete: %v", err)
	}
	if err := c.CancelBuild(ctx, a.URL(), "b1"); err != nil {
		t.Fatalf("cancel of a deleted build: %v", err)
	}
	if err := c.DeleteBuild(ctx, a.URL(), "b1"); err != nil {
		t.Fatalf("deleting twice: %v", err)
	}
}
