package main

import (
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/hostnet"
	"github.com/zeitwork/zeitwork/internal/servicetest"
)

func TestBadConfig(t *testing.T) {
	bin := servicetest.Binary(t, "zeitwork-node-agent")
	servicetest.ExpectBadConfig(t, bin, map[string]string{
		"VMM": "xen", "VM_SUBNET": "10.0.0.0/31", "PORT": "http", "OPERATOR_URL": "ftp://op", "HEARTBEAT_INTERVAL": "soon",
	}, "VMM", "VM_SUBNET", "PORT", "OPERATOR_URL", "HEARTBEAT_INTERVAL", "CLUSTER_TOKEN")
}

// TestBinary runs the agent as systemd would (no VMs): the service
// contract, the authenticated API, and a clean exit on SIGTERM.
func TestBinary(t *testing.T) {
	bin := servicetest.Binary(t, "zeitwork-node-agent")
	initBin := servicetest.Binary(t, "zeitwork-init")
	addr, work := servicetest.FreeAddr(t), t.TempDir()
	subnet := "10.232.0.0/24"
	t.Cleanup(func() {
		if m, err := hostnet.New(hostnet.Config{Subnet: netip.MustParsePrefix(subnet), StateDir: t.TempDir()}); err == nil {
			_ = exec.Command("nft", "delete", "table", "inet", m.Table()).Run()
		}
	})
	p := servicetest.Start(t, bin, map[string]string{
		"PORT": addr, "VM_WORK_DIR": work, "VM_SUBNET": subnet, "CLUSTER_TOKEN": "secret", "REGION": "test",
		"KERNEL_DIR": "/var/cache/zeitwork-test/kernel", "INIT_BIN": initBin,
	}, servicetest.URL(addr)+"/health/live")
	servicetest.CheckContract(t, bin, p, servicetest.URL(addr), "zeitwork_node_agent")
	for _, tc := range []struct {
		token string
		want  int
	}{{"", 401}, {"wrong", 401}, {"secret", 200}} {
		req, _ := http.NewRequest("GET", servicetest.URL(addr)+"/node/info", nil)
		if tc.token != "" {
			req.Header.Set("Authorization", "Bearer "+tc.token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Fatalf("token %q: %d, want %d", tc.token, resp.StatusCode, tc.want)
		}
	}
	stopDataPlane := func() error {
		cmd := exec.Command(bin, "dataplane", "stop")
		cmd.Env = append(os.Environ(), "VM_WORK_DIR="+work)
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	t.Cleanup(func() { _ = stopDataPlane() })
	p.StopOK(t, 30*time.Second)
	// The data plane outlives the agent (like its VMs) and says the agent
	// is away; `dataplane stop` ends it.
	if code := status(t, servicetest.URL(addr)+"/dataplane/health"); code != 200 {
		t.Fatalf("data plane after the agent stopped: %d", code)
	}
	if code := status(t, servicetest.URL(addr)+"/health"); code != 503 {
		t.Fatalf("agent health through the data plane with the agent gone: %d", code)
	}
	if err := stopDataPlane(); err != nil {
		t.Fatal(err)
	}
	if _, err := http.Get(servicetest.URL(addr) + "/dataplane/health"); err == nil {
		t.Fatal("the data plane still answers after dataplane stop")
	}
	if !strings.Contains(p.Output(), "node_id") {
		t.Fatalf("no node id logged:\n%s", p.Output())
	}
	if id, err := os.ReadFile(filepath.Join(work, "node-id")); err != nil || len(strings.TrimSpace(string(id))) != 36 {
		t.Fatalf("node id not persisted: %q %v", id, err)
	}
}

func status(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}
