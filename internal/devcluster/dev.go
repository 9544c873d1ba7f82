package devcluster

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

// RunDev is `zeitwork dev` (and `make dev`): it starts the platform on this
// machine, deploys the bundled sample app, prints how to reach it through
// the load balancer, and stops everything when ctx ends. State lives in
// --state (default .dev) and is reused by the next run.
func RunDev(ctx context.Context, args []string, log *slog.Logger) error {
	fs := flag.NewFlagSet("dev", flag.ContinueOnError)
	state := fs.String("state", ".dev", "state directory (database, VMs, certificates)")
	domain := fs.String("apps-domain", "zeitwork.test", "apps domain")
	if err := fs.Parse(args); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	abs, _ := filepath.Abs(*state)
	say := func(format string, a ...any) { fmt.Fprintf(os.Stderr, "==> "+format+"\n", a...) }
	say("starting PostgreSQL, registry, operator, node agent, edge proxy and load balancer (state in %s)", abs)
	c, err := Start(ctx, Config{BinDir: filepath.Dir(self), StateDir: abs, AppsDomain: *domain, RegistryAddr: "127.0.0.1:5005",
		Env: map[string]string{"RETENTION": "10m"}})
	if err != nil {
		return err
	}
	defer func() {
		say("stopping")
		err := c.Stop()
		c.StopVMs()
		if err != nil {
			log.Warn("stop", "err", err)
		}
	}()
	token, err := c.Bootstrap(ctx, "demo", "dev@zeitwork.test")
	if err != nil {
		return err
	}
	_ = os.WriteFile(filepath.Join(abs, "token"), []byte(token+"\n"), 0o600)
	ref, err := c.Registry.PushSample(ctx, "demo/hello", "v1", SampleImage{Binary: filepath.Join(filepath.Dir(self), "examples", "hello"),
		Env: map[string]string{"APP_VERSION": "v1"}, User: "1000:1000"})
	if err != nil {
		return err
	}
	api := apiclient.New(c.OperatorURL, token)
	err = api.Do(ctx, "POST", "/api/v1/projects", map[string]any{"name": "hello", "port": 8080, "health_path": "/healthz", "min_instances_per_region": 1}, nil)
	var ae *apiclient.Error
	if err != nil && !(errors.As(err, &ae) && ae.Status == 409) {
		return err
	}
	say("deploying the sample app %s (first boot fetches the guest kernel; microVMs boot in a few seconds)", ref)
	var d apiclient.Deployment
	if err := api.Do(ctx, "POST", "/api/v1/projects/hello/deployments", map[string]string{"image": ref}, &d); err != nil {
		return err
	}
	for d.Status != "active" {
		if d.Status == "failed" {
			return fmt.Errorf("sample deployment failed: %s (logs in %s/logs)", d.FailureReason, abs)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
		if err := api.Do(ctx, "GET", "/api/v1/deployments/"+d.ID, nil, &d); err != nil {
			return err
		}
	}
	r := c.Regions[0]
	versioned := strings.TrimPrefix(d.URL, "https://")
	prod := strings.TrimPrefix(d.ProductionURL, "https://")
	ca := c.CA.CertFile
	fmt.Printf(`
Zeitwork is running.

  operator API      %s   (token: %s)
  web console       %s   (sign in with the token)
  dev CA            %s
  versioned URL     %s
  production URL    %s

Through the load balancer (HTTPS on %s:8082, HTTP on %s:8085):
  curl --cacert %s --resolve %s:8082:%s https://%s:8082/
  curl --cacert %s --resolve %s:8082:%s https://%s:8082/
  curl -H 'Host: %s' http://%s:8085/

Use the CLI:
  zeitwork login --api-url %s --token %s
  zeitwork deploy --project hello --image <your image>
  zeitwork projects create web --git-url <repository> && zeitwork deploy --project web --commit <sha>
  zeitwork deploy --project web --source .     (builds the Dockerfile in a builder microVM)

Logs: %s/logs.  Ctrl-C stops everything.
`, c.OperatorURL, token, c.OperatorURL+"/", ca, d.URL, d.ProductionURL, r.IP, r.IP,
		ca, versioned, r.IP, versioned, ca, prod, r.IP, prod, prod, r.IP,
		c.OperatorURL, token, abs)
	<-ctx.Done()
	return nil
}
