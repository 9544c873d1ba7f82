package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/pgtest"
	"github.com/zeitwork/zeitwork/internal/servicetest"
)

const key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="

func TestBinary(t *testing.T) {
	bin := servicetest.Binary(t, "zeitwork-operator")
	servicetest.ExpectBadConfig(t, bin, map[string]string{"PORT": "http", "ENCRYPTION_KEY": "short", "BOOTSTRAP_TOKEN": "short", "DNS_RESOLVER": "nohostport", "DEPLOY_TIMEOUT": "soon"},
		"DATABASE_URL", "PORT", "ENCRYPTION_KEY", "CLUSTER_TOKEN", "BOOTSTRAP_TOKEN", "BOOTSTRAP_ORG", "BOOTSTRAP_EMAIL", "DNS_RESOLVER", "DEPLOY_TIMEOUT")

	// Two operators start at once on an empty database: both migrate
	// safely and serve.
	dbURL := pgtest.EmptyURL(t)
	var procs []*servicetest.Process
	var addrs []string
	for range 2 {
		addr := servicetest.FreeAddr(t)
		addrs = append(addrs, addr)
	}
	procs = make([]*servicetest.Process, len(addrs))
	var wg sync.WaitGroup
	for i, addr := range addrs {
		wg.Go(func() {
			procs[i] = servicetest.Start(t, bin, map[string]string{"LISTEN_ADDR": addr, "DATABASE_URL": dbURL, "CLUSTER_TOKEN": "t", "ENCRYPTION_KEY": key}, servicetest.URL(addr)+"/health")
		})
	}
	wg.Wait()
	for i, p := range procs {
		servicetest.CheckContract(t, bin, p, servicetest.URL(addrs[i]), "zeitwork_operator")
	}
	out, err := exec.Command(bin, "migrate").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "DATABASE_URL") {
		t.Fatalf("migrate without DATABASE_URL: %v %s", err, out)
	}
	cmd := exec.Command(bin, "migrate")
	cmd.Env = []string{"DATABASE_URL=" + dbURL}
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "0 migrations applied now") {
		t.Fatalf("second migrate: %v %s", err, out)
	}
	cmd = exec.Command(bin, "bootstrap", "acme", "ops@acme.test")
	cmd.Env = []string{"DATABASE_URL=" + dbURL, "CLUSTER_TOKEN=t", "ENCRYPTION_KEY=" + key}
	tok, err := cmd.Output()
	if err != nil || !strings.HasPrefix(string(tok), "zw_") {
		t.Fatalf("bootstrap: %v %q", err, tok)
	}
	// A given token makes bootstrap idempotent, also when run concurrently.
	const fixed = "zw_dev_0123456789abcdef0123"
	outs := make(chan string, 3)
	for range 3 {
		go func() {
			cmd := exec.Command(bin, "bootstrap", "--org", "dev", "--email", "dev@zeitwork.test")
			cmd.Env = []string{"DATABASE_URL=" + dbURL, "CLUSTER_TOKEN=t", "ENCRYPTION_KEY=" + key, "BOOTSTRAP_TOKEN=" + fixed}
			out, err := cmd.Output() // the token on stdout, logs on stderr
			if err != nil {
				out = append(out, err.Error()...)
			}
			outs <- string(out)
		}()
	}
	for range 3 {
		if out := <-outs; strings.TrimSpace(out) != fixed {
			t.Fatalf("idempotent bootstrap printed %q", out)
		}
	}
	for _, tc := range []struct {
		tok  string
		want int
	}{{fixed, 200}, {strings.TrimSpace(string(tok)), 200}, {"zw_wrong", 401}} {
		req, _ := http.NewRequest("GET", servicetest.URL(addrs[1])+"/api/v1/whoami", nil)
		req.Header.Set("Authorization", "Bearer "+tc.tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Fatalf("whoami with %q: %d, want %d", tc.tok, resp.StatusCode, tc.want)
		}
	}
	cmd = exec.Command(bin, "bootstrap", "--org", "Not_A_Label", "--email", "x@y.test")
	cmd.Env = []string{"DATABASE_URL=" + dbURL, "CLUSTER_TOKEN=t", "ENCRYPTION_KEY=" + key}
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "DNS label") {
		t.Fatalf("bootstrap with a bad org name: %v %s", err, out)
	}
	code, body := servicetest.Get(t, servicetest.URL(addrs[0])+"/api/v1/projects")
	if code != 401 || !strings.Contains(body, `"code":"unauthorized"`) {
		t.Fatalf("unauthenticated API call: %d %s", code, body)
	}
	// A shutdown answers the route table long polls in progress at once
	// (instead of draining until they end), with a whole table.
	routes := func(q string) *http.Request {
		req, _ := http.NewRequest("GET", servicetest.URL(addrs[0])+"/api/v1/routes?"+q, nil)
		req.Header.Set("Authorization", "Bearer t")
		return req
	}
	var current struct{ Version string }
	if resp, err := http.DefaultClient.Do(routes("")); err != nil {
		t.Fatal(err)
	} else {
		err = json.NewDecoder(resp.Body).Decode(&current)
		resp.Body.Close()
		if err != nil || current.Version == "" {
			t.Fatalf("route table: %+v %v", current, err)
		}
	}
	polls := make(chan error, 2)
	for _, q := range []string{"wait=30s&heartbeat=2s", "wait=30s"} {
		req := routes("version=" + current.Version + "&" + q)
		go func() {
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				polls <- err
				return
			}
			defer resp.Body.Close()
			var table struct{ Version string }
			if err := json.NewDecoder(resp.Body).Decode(&table); err != nil || table.Version == "" {
				polls <- fmt.Errorf("%s: status %d, table %+v, %v", q, resp.StatusCode, table, err)
				return
			}
			polls <- nil
		}()
	}
	time.Sleep(500 * time.Millisecond) // both polls wait
	start := time.Now()
	procs[0].StopOK(t, 10*time.Second)
	for range 2 {
		if err := <-polls; err != nil {
			t.Errorf("route table poll during shutdown: %v", err)
		}
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the operator took %s to stop with route table polls waiting", took)
	}
	procs[1].StopOK(t, 30*time.Second)
}
