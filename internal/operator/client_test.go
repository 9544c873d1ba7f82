package operator

import (
	"bufio"
	"errors"
	"testing"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

// TestClient drives the typed API client (what the CLI uses) against a
// real operator, so client and server documents cannot drift apart.
func TestClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tok, err := e.ops[0].Bootstrap(t.Context(), "acme", "ops@acme.test", "t")
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	c := apiclient.New(e.url, tok)
	me, err := c.Whoami(ctx)
	if err != nil || me.Organisation != "acme" {
		t.Fatalf("whoami: %+v %v", me, err)
	}
	name, one := "api", 1
	p, err := c.CreateProject(ctx, apiclient.ProjectSpec{Name: &name, MinInstancesPerRegion: &one})
	if err != nil || p.Name != "api" || p.MinInstancesPerRegion != 1 || p.Port != 8080 || p.ProductionURL != "https://api-acme.zeitwork.test" {
		t.Fatalf("create: %+v %v", p, err)
	}
	bad := "Bad_Name"
	var apiErr *apiclient.Error
	if _, err := c.CreateProject(ctx, apiclient.ProjectSpec{Name: &bad}); !errors.As(err, &apiErr) || apiErr.Status != 400 || apiErr.Code != "invalid_request" {
		t.Fatalf("bad name: %v", err)
	}
	port := 9000
	if p, err = c.UpdateProject(ctx, "api", apiclient.ProjectSpec{Port: &port}); err != nil || p.Port != 9000 || p.MinInstancesPerRegion != 1 {
		t.Fatalf("update: %+v %v", p, err)
	}
	if err := c.SetEnv(ctx, "api", map[string]string{"A": "1", "B": "2"}); err != nil {
		t.Fatal(err)
	}
	if err := c.UnsetEnv(ctx, "api", "A"); err != nil {
		t.Fatal(err)
	}
	if env, err := c.Env(ctx, "api"); err != nil || len(env) != 1 || env[0].Name != "B" {
		t.Fatalf("env: %+v %v", env, err)
	}
	d, err := c.Deploy(ctx, "api", apiclient.DeployRequest{Image: e.images["v1"]}, "key-1")
	if err != nil || d.ID == "" || d.Status == "failed" || d.Hostname == "" || d.CreatedAt.IsZero() {
		t.Fatalf("deploy: %+v %v", d, err)
	}
	again, err := c.Deploy(ctx, "api", apiclient.DeployRequest{Image: e.images["v1"]}, "key-1")
	if err != nil || again.ID != d.ID {
		t.Fatalf("idempotent deploy: %+v %v", again, err)
	}
	active := e.waitDeployment(tok, d.ID, "active")
	got, err := c.Deployment(ctx, d.ID)
	if err != nil || got.Status != "active" || !got.Active || len(got.Instances) != 3 || got.ImageDigest == "" || got.ActiveAt == nil || len(got.Regions) != 3 {
		t.Fatalf("deployment: %+v %v", got, err)
	}
	if list, err := c.Deployments(ctx, "api"); err != nil || len(list) != 1 || list[0].ID != active.ID.String() {
		t.Fatalf("deployments: %+v %v", list, err)
	}
	if insts, err := c.Instances(ctx, d.ID); err != nil || len(insts) != 3 || !insts[0].Healthy {
		t.Fatalf("instances: %+v %v", insts, err)
	}
	logs, err := c.Logs(ctx, d.ID, false)
	if err != nil {
		t.Fatal(err)
	}
	lines := 0
	for sc := bufio.NewScanner(logs); sc.Scan(); {
		lines++
	}
	logs.Close()
	if lines != 3 {
		t.Fatalf("%d log lines", lines)
	}
	if _, err := c.StopDeployment(ctx, d.ID); !errors.As(err, &apiErr) || apiErr.Status != 409 {
		t.Fatalf("stopping the active deployment: %v", err)
	}
	if _, err := c.Rollback(ctx, "api", ""); !errors.As(err, &apiErr) || apiErr.Status != 409 {
		t.Fatalf("rollback without history: %v", err)
	}
	dom, err := c.AddDomain(ctx, "api", "api.example.org")
	if err != nil || len(dom.DNSRecords) == 0 {
		t.Fatalf("add domain: %+v %v", dom, err)
	}
	if v, err := c.VerifyDomain(ctx, "api.example.org"); err != nil || v.Verified || v.LastError == "" {
		t.Fatalf("verify: %+v %v", v, err)
	}
	e.dns.SetCNAME("api.example.org", "edge.zeitwork.test")
	if v, err := c.VerifyDomain(ctx, dom.ID); err != nil || !v.Verified {
		t.Fatalf("verify with CNAME: %+v %v", v, err)
	}
	if ds, err := c.Domains(ctx, "api"); err != nil || len(ds) != 1 || !ds[0].Verified {
		t.Fatalf("domains: %+v %v", ds, err)
	}
	if err := c.RemoveDomain(ctx, dom.ID); err != nil {
		t.Fatal(err)
	}
	if nodes, err := c.Nodes(ctx); err != nil || len(nodes) != 6 || nodes[0].State != "ready" {
		t.Fatalf("nodes: %+v %v", nodes, err)
	}
	if regions, err := c.Regions(ctx); err != nil || len(regions) != 3 || regions[0].ReadyNodes != 2 {
		t.Fatalf("regions: %+v %v", regions, err)
	}
	nt, err := c.CreateToken(ctx, "ci")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.RevokeToken(ctx, nt.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := apiclient.New(e.url, nt.Token).Projects(ctx); !errors.As(err, &apiErr) || apiErr.Status != 401 {
		t.Fatalf("revoked token: %v", err)
	}
	if err := c.DeleteProject(ctx, "api"); err != nil {
		t.Fatal(err)
	}
	if ps, err := c.Projects(ctx); err != nil || len(ps) != 0 {
		t.Fatalf("projects after delete: %+v %v", ps, err)
	}
	if _, err := c.Deployment(ctx, d.ID); !errors.As(err, &apiErr) || apiErr.Status != 404 {
		t.Fatalf("deployment of a deleted project: %v", err)
	}
	e.eventually("VMs of the deleted project stopped", func() bool {
		for _, a := range e.agents {
			if a.Count() != 0 {
				return false
			}
		}
		return true
	})
	if r := e.routeFor(active.Hostname); r != nil {
		t.Fatalf("deleted project still routed: %+v", r)
	}
	// The name and the domain are free again.
	if _, err := c.CreateProject(ctx, apiclient.ProjectSpec{Name: &name}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.AddDomain(ctx, "api", "api.example.org"); err != nil {
		t.Fatal(err)
	}
}
