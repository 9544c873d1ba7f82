package e2e

import (
	"context"
	"encoding/json"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/devcluster"
)

type deploymentDoc struct {
	apiclient.Deployment
	Instances []struct {
		ID      string `json:"id"`
		NodeID  string `json:"node_id"`
		Region  string `json:"region"`
		Healthy bool   `json:"healthy"`
		Desired string `json:"desired_state"`
	} `json:"instances"`
}

// TestThreeRegions runs three regions, each with its own load balancer,
// edge proxy and two node agents on their own loopback addresses: a
// deployment runs min_instances_per_region in every region and serves
// through every region's load balancer; losing a node agent (and its VMs)
// gets its instances replaced in the same region.
func TestThreeRegions(t *testing.T) {
	s := startCluster(t, devcluster.Config{
		Regions: []string{"local-a", "local-b", "local-c"}, NodesPerRegion: 2,
		Env: map[string]string{"DEPLOY_TIMEOUT": "180s", "NODE_DOWN_AFTER": "6s"},
	})
	ref := s.push("multi", map[string]string{"APP_VERSION": "multi"})
	if code, out, errs := s.cli("projects", "create", "web", "--port", "8080", "--health-path", "/healthz", "--min-instances", "1"); code != 0 {
		t.Fatalf("projects create: %s %s", out, errs)
	}
	code, out, errs := s.cli("deploy", "--project", "web", "--image", ref, "--json")
	if code != 0 {
		t.Fatalf("deploy: %d %s %s", code, out, errs)
	}
	var d deploymentDoc
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"local-a", "local-b", "local-c"} {
		if ri := d.Regions[r]; ri.Healthy != 1 || ri.Desired != 1 {
			t.Fatalf("region %s: %+v", r, d.Regions)
		}
	}
	for i := range s.c.Regions {
		c := s.client(i, "")
		if code, body, err := get(c, d.ProductionURL+"/"); code != 200 || !strings.Contains(body, "hello from multi") {
			t.Fatalf("region %s LB: %d %q %v", s.c.Regions[i].Name, code, body, err)
		}
	}
	if code, out, _ := s.cli("regions", "ls"); code != 0 || !strings.Contains(out, "local-b") {
		t.Fatalf("regions ls: %s", out)
	}

	// Lose the node of local-b that runs the instance: agent and VMs die.
	api := apiclient.New(s.c.OperatorURL, s.token)
	if err := api.Do(context.Background(), "GET", "/api/v1/deployments/"+d.ID, nil, &d); err != nil {
		t.Fatal(err)
	}
	var victim string
	for _, in := range d.Instances {
		if in.Region == "local-b" && in.Desired == "running" {
			victim = in.NodeID
		}
	}
	var nodes struct {
		Nodes []struct {
			ID      string `json:"id"`
			Address string `json:"address"`
		} `json:"nodes"`
	}
	if err := api.Do(context.Background(), "GET", "/api/v1/nodes", nil, &nodes); err != nil {
		t.Fatal(err)
	}
	var addr string
	for _, n := range nodes.Nodes {
		if n.ID == victim {
			addr = n.Address
		}
	}
	idx := -1
	for i, p := range s.c.Regions[1].NodeAgents {
		if strings.Contains(addr, strings.TrimPrefix(strings.TrimSuffix(p.Health, "/health/live"), "http://")) {
			idx = i
		}
	}
	if idx < 0 {
		t.Fatalf("cannot find the node agent at %s", addr)
	}
	for _, pid := range vmPIDsOf(t, s, s.c.Regions[1].NodeAgents[idx].Env["VM_WORK_DIR"]) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	s.c.Regions[1].NodeAgents[idx].Kill()
	deadline := time.Now().Add(4 * time.Minute)
	for {
		var now deploymentDoc
		if err := api.Do(context.Background(), "GET", "/api/v1/deployments/"+d.ID, nil, &now); err != nil {
			t.Fatal(err)
		}
		replaced := false
		for _, in := range now.Instances {
			if in.Region == "local-b" && in.Desired == "running" && in.Healthy && in.NodeID != victim {
				replaced = true
			}
		}
		if replaced {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance of the lost node never replaced: %+v", now.Instances)
		}
		time.Sleep(500 * time.Millisecond)
	}
	s.waitBody(s.client(1, ""), d.ProductionURL+"/", "hello from multi", time.Minute)
}
