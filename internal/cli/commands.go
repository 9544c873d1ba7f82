package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

type app struct {
	stdout, stderr io.Writer
	apiURL, token  string
	project        string
	jsonOut        bool
	cfg            *fileConfig
}

func (a *app) client() (*apiclient.Client, error) {
	cfg, err := loadConfig()
	if err != nil {
		return nil, err
	}
	a.cfg = cfg
	u := firstNonEmpty(a.apiURL, os.Getenv("ZEITWORK_API_URL"), cfg.APIURL)
	t := firstNonEmpty(a.token, os.Getenv("ZEITWORK_TOKEN"), cfg.Token)
	if u == "" || t == "" {
		return nil, &exitError{code: ExitAuth, err: errors.New("not logged in"), hint: "run 'zeitwork login --api-url URL --token TOKEN' or set ZEITWORK_API_URL and ZEITWORK_TOKEN"}
	}
	return apiclient.New(u, t), nil
}

func firstNonEmpty(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}

// classify maps API errors to exit codes and hints.
func classify(err error) error {
	var ae *apiclient.Error
	if errors.As(err, &ae) {
		switch ae.Status {
		case 401, 403:
			return &exitError{code: ExitAuth, err: err, hint: "your token is missing, wrong or revoked: run 'zeitwork login'"}
		case 404:
			return &exitError{code: ExitNotFound, err: err}
		case 400:
			return &exitError{code: ExitUsage, err: err}
		}
	}
	return err
}

func (a *app) projectName() (string, error) {
	if a.project != "" {
		return a.project, nil
	}
	if p := os.Getenv("ZEITWORK_PROJECT"); p != "" {
		return p, nil
	}
	cfg := a.cfg
	if cfg == nil {
		var err error
		if cfg, err = loadConfig(); err != nil {
			return "", err
		}
	}
	wd, _ := os.Getwd()
	for dir := wd; ; dir = filepath.Dir(dir) {
		if p, ok := cfg.Links[dir]; ok {
			return p, nil
		}
		if filepath.Dir(dir) == dir {
			break
		}
	}
	return "", &exitError{code: ExitUsage, err: errors.New("no project given"), hint: "pass --project NAME or run 'zeitwork link NAME' in this directory"}
}

func (a *app) table(header []string, rows [][]string) {
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

func (a *app) emitJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (a *app) progress(format string, args ...any) { fmt.Fprintf(a.stderr, format+"\n", args...) }

func addCommands(root *cobra.Command, a *app) {
	root.PersistentFlags().StringVar(&a.apiURL, "api-url", "", "operator URL (default: from login or ZEITWORK_API_URL)")
	root.PersistentFlags().StringVar(&a.token, "token", "", "API token (default: from login or ZEITWORK_TOKEN)")
	root.PersistentFlags().StringVarP(&a.project, "project", "p", "", "project (default: the linked one)")
	root.PersistentFlags().BoolVar(&a.jsonOut, "json", false, "print JSON")

	root.AddCommand(&cobra.Command{Use: "login", Short: "Store the operator URL and token", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		u := firstNonEmpty(a.apiURL, os.Getenv("ZEITWORK_API_URL"))
		t := firstNonEmpty(a.token, os.Getenv("ZEITWORK_TOKEN"))
		if t == "" {
			fmt.Fprint(a.stderr, "token: ")
			line, _ := bufio.NewReader(cmd.InOrStdin()).ReadString('\n')
			t = strings.TrimSpace(line)
		}
		if pu, err := url.Parse(u); u == "" || err != nil || (pu.Scheme != "http" && pu.Scheme != "https") {
			return &exitError{code: ExitUsage, err: fmt.Errorf("bad or missing --api-url %q", u), hint: "e.g. zeitwork login --api-url https://api.zeitwork.com --token zw_…"}
		}
		c := apiclient.New(u, t)
		var me struct {
			Organisation string `json:"organisation"`
		}
		if err := c.Do(cmd.Context(), "GET", "/api/v1/whoami", nil, &me); err != nil {
			return classify(err)
		}
		cfg, err := loadConfig()
		if err != nil {
			return err
		}
		cfg.APIURL, cfg.Token = u, t
		if err := cfg.save(); err != nil {
			return err
		}
		a.progress("logged in to %s as organisation %s", u, me.Organisation)
		return nil
	}})
	root.AddCommand(&cobra.Command{Use: "logout", Short: "Forget the stored token", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		cfg, err := loadConfig()
		if err != nil {
			return err
		}
		cfg.Token = ""
		return cfg.save()
	}})
	root.AddCommand(&cobra.Command{Use: "whoami", Short: "Show the organisation of the current token", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		var me map[string]any
		if err := c.Do(cmd.Context(), "GET", "/api/v1/whoami", nil, &me); err != nil {
			return classify(err)
		}
		if a.jsonOut {
			return a.emitJSON(me)
		}
		fmt.Fprintf(a.stdout, "%v\n", me["organisation"])
		return nil
	}})
	root.AddCommand(projectsCommand(a), deployCommand(a), deploymentsCommand(a), envCommand(a), domainsCommand(a), logsCommand(a), buildsCommand(a))
	root.AddCommand(&cobra.Command{Use: "link PROJECT", Short: "Remember PROJECT for this directory", Args: cobra.ExactArgs(1), RunE: func(cmd *cobra.Command, args []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		if err := c.Do(cmd.Context(), "GET", "/api/v1/projects/"+url.PathEscape(args[0]), nil, nil); err != nil {
			return classify(err)
		}
		wd, _ := os.Getwd()
		if a.cfg.Links == nil {
			a.cfg.Links = map[string]string{}
		}
		a.cfg.Links[wd] = args[0]
		if err := a.cfg.save(); err != nil {
			return err
		}
		a.progress("linked %s to project %s", wd, args[0])
		return nil
	}})
	simple := func(use, short string, method string, path func(args []string) (string, error), body func(cmd *cobra.Command, args []string) any, args cobra.PositionalArgs, show func(any) error) *cobra.Command {
		return &cobra.Command{Use: use, Short: short, Args: args, RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			p, err := path(args)
			if err != nil {
				return err
			}
			var out any
			var b any
			if body != nil {
				b = body(cmd, args)
			}
			if err := c.Do(cmd.Context(), method, p, b, &out); err != nil {
				return classify(err)
			}
			if a.jsonOut || show == nil {
				return a.emitJSON(out)
			}
			return show(out)
		}}
	}
	proj := func(suffix string) func([]string) (string, error) {
		return func([]string) (string, error) {
			p, err := a.projectName()
			return "/api/v1/projects/" + url.PathEscape(p) + suffix, err
		}
	}
	rollback := simple("rollback [DEPLOYMENT]", "Move production back to the previous healthy deployment (or DEPLOYMENT)", "POST", proj("/rollback"),
		func(cmd *cobra.Command, args []string) any {
			if len(args) == 1 {
				return map[string]string{"deployment_id": args[0]}
			}
			return map[string]string{}
		}, cobra.MaximumNArgs(1), func(v any) error {
			m := v.(map[string]any)
			fmt.Fprintf(a.stdout, "production → %v (%v)\n", m["id"], m["url"])
			return nil
		})
	promote := simple("promote DEPLOYMENT", "Point production at DEPLOYMENT", "POST", func(args []string) (string, error) {
		return "/api/v1/deployments/" + url.PathEscape(args[0]) + "/promote", nil
	}, nil, cobra.ExactArgs(1), func(v any) error {
		m := v.(map[string]any)
		fmt.Fprintf(a.stdout, "production → %v (%v)\n", m["id"], m["status"])
		return nil
	})
	var perRegion int
	scale := &cobra.Command{Use: "scale", Short: "Set the instances per region", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		if perRegion < 1 {
			return &exitError{code: ExitUsage, err: errors.New("--per-region must be at least 1")}
		}
		c, err := a.client()
		if err != nil {
			return err
		}
		p, err := proj("")(nil)
		if err != nil {
			return err
		}
		if err := c.Do(cmd.Context(), "PATCH", p, map[string]int{"min_instances_per_region": perRegion}, nil); err != nil {
			return classify(err)
		}
		a.progress("scaled to %d instances per region", perRegion)
		return nil
	}}
	scale.Flags().IntVar(&perRegion, "per-region", 0, "instances in every region")
	nodes := &cobra.Command{Use: "nodes", Short: "Worker nodes"}
	nodes.AddCommand(simple("ls", "List worker nodes", "GET", func([]string) (string, error) { return "/api/v1/nodes", nil }, nil, cobra.NoArgs, func(v any) error {
		var rows [][]string
		for _, n := range asList(v, "nodes") {
			rows = append(rows, []string{str(n["id"]), str(n["region"]), str(n["hostname"]), str(n["state"]), str(n["instances"]),
				str(n["builds"]) + "/" + str(n["max_builds"]), str(n["address"])})
		}
		a.table([]string{"ID", "REGION", "HOSTNAME", "STATE", "INSTANCES", "BUILDS", "ADDRESS"}, rows)
		return nil
	}))
	// Changing nodes takes the cluster token or an ADMIN_ORGS token.
	for _, c := range []struct{ use, short, method, suffix, done string }{
		{"drain NODE", "Stop placing on a node and move its instances to others of its region (admin)", "POST", "/drain", "draining"},
		{"enable NODE", "Make a drained node eligible again (admin)", "POST", "/enable", "ready"},
		{"rm NODE", "Remove a drained node that runs no instances, for good (admin)", "DELETE", "", "removed"},
	} {
		nodes.AddCommand(simple(c.use, c.short, c.method, func(args []string) (string, error) {
			return "/api/v1/nodes/" + url.PathEscape(args[0]) + c.suffix, nil
		}, nil, cobra.ExactArgs(1), func(v any) error {
			m, _ := v.(map[string]any)
			fmt.Fprintf(a.stdout, "node %v %s\n", m["id"], c.done)
			return nil
		}))
	}
	regions := &cobra.Command{Use: "regions", Short: "Regions"}
	regions.AddCommand(simple("ls", "List regions", "GET", func([]string) (string, error) { return "/api/v1/regions", nil }, nil, cobra.NoArgs, func(v any) error {
		var rows [][]string
		for _, r := range asList(v, "regions") {
			rows = append(rows, []string{str(r["name"]), str(r["ready_nodes"]), str(r["nodes"])})
		}
		a.table([]string{"REGION", "READY NODES", "NODES"}, rows)
		return nil
	}))
	root.AddCommand(rollback, promote, scale, nodes, regions)
}

func asList(v any, key string) []map[string]any {
	m, _ := v.(map[string]any)
	raw, _ := m[key].([]any)
	var out []map[string]any
	for _, x := range raw {
		if mm, ok := x.(map[string]any); ok {
			out = append(out, mm)
		}
	}
	return out
}

func str(v any) string {
	switch x := v.(type) {
	case nil:
		return "-"
	case float64:
		return fmt.Sprint(int64(x))
	default:
		return fmt.Sprint(x)
	}
}

func projectsCommand(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "projects", Short: "Manage projects"}
	var port, perRegion, vcpus, mem int
	var health, repo, branch, template, gitURL, dockerfile, buildContext string
	var tokenStdin bool
	create := &cobra.Command{Use: "create NAME", Short: "Create a project", Long: `Create a project.

A project deploys images: given with 'zeitwork deploy --image', or named
for a commit by --image-template. Without an image template, a project
with --github-repo or --git-url builds every pushed commit (and
'zeitwork deploy --commit SHA' or '--source DIR') from its Dockerfile.`, Args: cobra.ExactArgs(1), RunE: func(cmd *cobra.Command, args []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		body := map[string]any{"name": args[0], "port": port, "health_path": health, "min_instances_per_region": perRegion,
			"vcpus": vcpus, "memory_mib": mem, "github_repo": repo, "github_branch": branch, "image_template": template, "git_url": gitURL}
		if cmd.Flags().Changed("dockerfile") {
			body["dockerfile"] = dockerfile
		}
		if cmd.Flags().Changed("build-context") {
			body["build_context"] = buildContext
		}
		if tokenStdin {
			b, err := io.ReadAll(io.LimitReader(cmd.InOrStdin(), 8<<10))
			if err != nil {
				return err
			}
			tok := strings.TrimRight(string(b), "\r\n")
			if tok == "" {
				return &exitError{code: ExitUsage, err: errors.New("--git-token-stdin: stdin is empty"), hint: "e.g. printf %s \"$GIT_TOKEN\" | zeitwork projects create web --git-token-stdin …"}
			}
			body["git_token"] = tok
		}
		var out map[string]any
		if err := c.Do(cmd.Context(), "POST", "/api/v1/projects", body, &out); err != nil {
			return classify(err)
		}
		if a.jsonOut {
			return a.emitJSON(out)
		}
		fmt.Fprintf(a.stdout, "%s\t%s\n", out["name"], out["production_url"])
		return nil
	}}
	create.Flags().IntVar(&port, "port", 8080, "port the app listens on")
	create.Flags().StringVar(&health, "health-path", "/", "HTTP health check path")
	create.Flags().IntVar(&perRegion, "min-instances", 3, "instances per region")
	create.Flags().IntVar(&vcpus, "vcpus", 1, "vCPUs per instance")
	create.Flags().IntVar(&mem, "memory", 128, "memory per instance (MiB)")
	create.Flags().StringVar(&repo, "github-repo", "", "GitHub repository owner/name")
	create.Flags().StringVar(&branch, "github-branch", "main", "production branch")
	create.Flags().StringVar(&template, "image-template", "", "image for a commit, e.g. ghcr.io/acme/web:{sha} (without one, commits are built from source)")
	create.Flags().StringVar(&gitURL, "git-url", "", "git repository to build from (default: https://github.com/<github-repo>.git)")
	create.Flags().StringVar(&dockerfile, "dockerfile", "Dockerfile", "Dockerfile, relative to the build context")
	create.Flags().StringVar(&buildContext, "build-context", ".", "build context directory in the repository")
	create.Flags().BoolVar(&tokenStdin, "git-token-stdin", false, "read an HTTPS token for a private repository from stdin (stored encrypted, never shown)")
	ls := &cobra.Command{Use: "ls", Short: "List projects", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		var out map[string]any
		if err := c.Do(cmd.Context(), "GET", "/api/v1/projects", nil, &out); err != nil {
			return classify(err)
		}
		if a.jsonOut {
			return a.emitJSON(out)
		}
		var rows [][]string
		for _, p := range asList(out, "projects") {
			rows = append(rows, []string{str(p["name"]), str(p["min_instances_per_region"]), str(p["active_deployment_id"]), str(p["production_url"])})
		}
		a.table([]string{"NAME", "PER REGION", "ACTIVE DEPLOYMENT", "PRODUCTION URL"}, rows)
		return nil
	}}
	rm := &cobra.Command{Use: "rm NAME", Short: "Delete a project and stop its deployments", Args: cobra.ExactArgs(1), RunE: func(cmd *cobra.Command, args []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		if err := c.Do(cmd.Context(), "DELETE", "/api/v1/projects/"+url.PathEscape(args[0]), nil, nil); err != nil {
			return classify(err)
		}
		a.progress("deleted project %s", args[0])
		return nil
	}}
	cmd.AddCommand(create, ls, rm)
	return cmd
}

func deployCommand(a *app) *cobra.Command {
	var image, sha, source string
	var wait, detach bool
	var timeout time.Duration
	cmd := &cobra.Command{Use: "deploy", Short: "Deploy an image, a commit (through the image template, or built from source) or a source directory", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		if image == "" && sha == "" && source == "" {
			return &exitError{code: ExitUsage, err: errors.New("nothing to deploy"), hint: "pass --image REF, --commit SHA or --source DIR"}
		}
		if source != "" && (image != "" || sha != "") {
			return &exitError{code: ExitUsage, err: errors.New("--source cannot be combined with --image or --commit")}
		}
		c, err := a.client()
		if err != nil {
			return err
		}
		p, err := a.projectName()
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
		defer cancel()
		req := apiclient.DeployRequest{Image: image, CommitSHA: sha}
		if source != "" {
			src, err := a.uploadDir(ctx, c, p, source)
			if err != nil {
				return err
			}
			req.SourceID = src.SourceID
		}
		var d apiclient.Deployment
		if err := c.Do(ctx, "POST", "/api/v1/projects/"+url.PathEscape(p)+"/deployments", req, &d); err != nil {
			return classify(err)
		}
		if d.Build != nil {
			a.progress("deployment %s created; building %s (build %s)", d.ID, d.Image, d.Build.ID)
		} else {
			a.progress("deployment %s created for %s", d.ID, d.Image)
		}
		if detach || !wait {
			if a.jsonOut {
				return a.emitJSON(d)
			}
			fmt.Fprintln(a.stdout, d.URL)
			return nil
		}
		if d.Build != nil {
			// The build log live; a broken stream only ends the log (the
			// phases below tell the outcome).
			if err := a.printBuildLog(ctx, c, d.Build.ID, true, a.stderr); err != nil && ctx.Err() == nil {
				a.progress("(build log unavailable: %v)", err)
			}
		}
		final, err := a.follow(ctx, c, d.ID)
		if err != nil {
			return err
		}
		if a.jsonOut {
			return a.emitJSON(final)
		}
		fmt.Fprintf(a.stdout, "%s\n", final.URL)
		if final.ProductionURL != "" && final.Active {
			fmt.Fprintf(a.stdout, "%s\n", final.ProductionURL)
		}
		return nil
	}}
	cmd.Flags().StringVar(&image, "image", "", "OCI image reference to deploy")
	cmd.Flags().StringVar(&sha, "commit", "", "commit SHA: the project's image template names its image, or (without one) it is built from the repository")
	cmd.Flags().StringVar(&source, "source", "", "build DIR (a tar.gz of it, without .git) with the project's Dockerfile and deploy it")
	cmd.Flags().BoolVar(&wait, "wait", true, "follow the deployment until it is live or fails")
	cmd.Flags().BoolVar(&detach, "detach", false, "return as soon as the deployment is created")
	cmd.Flags().DurationVar(&timeout, "timeout", 15*time.Minute, "how long to wait")
	return cmd
}

// follow polls a deployment, printing each phase with its duration, until
// it is active (or healthy, for previews) or failed.
func (a *app) follow(ctx context.Context, c *apiclient.Client, id string) (*apiclient.Deployment, error) {
	start := time.Now()
	last, lastCounts := "", ""
	for {
		var d apiclient.Deployment
		if err := c.Do(ctx, "GET", "/api/v1/deployments/"+id, nil, &d); err != nil {
			return nil, classify(err)
		}
		counts := regionSummary(d.Regions)
		if d.Status != last || counts != lastCounts {
			a.progress("%-10s %6.1fs  %s", d.Status, time.Since(start).Seconds(), counts)
			last, lastCounts = d.Status, counts
		}
		switch {
		case d.Status == "active", d.Status == "healthy" && d.Preview:
			a.progress("live after %.1fs", time.Since(start).Seconds())
			return &d, nil
		case d.Status == "failed", d.Status == "stopped":
			hint := "see 'zeitwork logs " + d.ID + "'"
			if d.Build != nil && d.Build.State != "succeeded" {
				hint = "see 'zeitwork builds logs " + d.Build.ID + "'"
			}
			return nil, &exitError{code: ExitFailure, err: fmt.Errorf("deployment %s %s: %s", d.ID, d.Status, d.FailureReason), hint: hint}
		case d.Status == "superseded":
			return &d, nil
		}
		select {
		case <-ctx.Done():
			return nil, &exitError{code: ExitFailure, err: fmt.Errorf("gave up waiting: deployment %s is still %s", id, d.Status), hint: "it keeps going; check with 'zeitwork deployments ls'"}
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func regionSummary(m map[string]apiclient.RegionInstances) string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		r := m[k]
		parts = append(parts, fmt.Sprintf("%s %d/%d healthy", k, r.Healthy, r.Desired))
	}
	return strings.Join(parts, ", ")
}

func deploymentsCommand(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "deployments", Short: "Deployments of the project"}
	cmd.AddCommand(&cobra.Command{Use: "ls", Short: "List deployments", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		p, err := a.projectName()
		if err != nil {
			return err
		}
		var out struct {
			Deployments []apiclient.Deployment `json:"deployments"`
		}
		if err := c.Do(cmd.Context(), "GET", "/api/v1/projects/"+url.PathEscape(p)+"/deployments", nil, &out); err != nil {
			return classify(err)
		}
		if a.jsonOut {
			return a.emitJSON(out)
		}
		var rows [][]string
		for _, d := range out.Deployments {
			active := ""
			if d.Active {
				active = "*"
			}
			rows = append(rows, []string{d.ID, d.Status + active, d.CreatedAt.Local().Format("2006-01-02 15:04:05"), d.Image, d.URL})
		}
		a.table([]string{"ID", "STATUS", "CREATED", "IMAGE", "URL"}, rows)
		return nil
	}})
	return cmd
}

func envCommand(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "env", Short: "Project environment variables (values are write-only)"}
	put := func(ctx context.Context, vars map[string]string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		p, err := a.projectName()
		if err != nil {
			return err
		}
		if err := c.Do(ctx, "PUT", "/api/v1/projects/"+url.PathEscape(p)+"/env", map[string]any{"vars": vars}, nil); err != nil {
			return classify(err)
		}
		names := make([]string, 0, len(vars))
		for k := range vars {
			names = append(names, k)
		}
		sort.Strings(names)
		a.progress("set %s (applies to the next deployment)", strings.Join(names, ", "))
		return nil
	}
	cmd.AddCommand(&cobra.Command{Use: "set KEY=VALUE...", Short: "Set variables", Args: cobra.MinimumNArgs(1), RunE: func(cmd *cobra.Command, args []string) error {
		vars := map[string]string{}
		for _, kv := range args {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || !envKeyRE.MatchString(k) {
				return &exitError{code: ExitUsage, err: fmt.Errorf("%q is not KEY=VALUE", kv)}
			}
			vars[k] = v
		}
		return put(cmd.Context(), vars)
	}})
	cmd.AddCommand(&cobra.Command{Use: "import FILE", Short: "Set variables from a dotenv file", Args: cobra.ExactArgs(1), RunE: func(cmd *cobra.Command, args []string) error {
		b, err := os.ReadFile(args[0])
		if err != nil {
			return err
		}
		vars, err := ParseDotenv(string(b))
		if err != nil {
			return &exitError{code: ExitUsage, err: fmt.Errorf("%s: %w", args[0], err)}
		}
		if len(vars) == 0 {
			return &exitError{code: ExitUsage, err: fmt.Errorf("%s sets no variables", args[0])}
		}
		return put(cmd.Context(), vars)
	}})
	cmd.AddCommand(&cobra.Command{Use: "ls", Short: "List variable names", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		p, err := a.projectName()
		if err != nil {
			return err
		}
		var out map[string]any
		if err := c.Do(cmd.Context(), "GET", "/api/v1/projects/"+url.PathEscape(p)+"/env", nil, &out); err != nil {
			return classify(err)
		}
		if a.jsonOut {
			return a.emitJSON(out)
		}
		var rows [][]string
		for _, v := range asList(out, "env") {
			rows = append(rows, []string{str(v["name"]), str(v["updated_at"])})
		}
		a.table([]string{"NAME", "UPDATED"}, rows)
		return nil
	}})
	cmd.AddCommand(&cobra.Command{Use: "unset KEY", Short: "Remove a variable", Args: cobra.ExactArgs(1), RunE: func(cmd *cobra.Command, args []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		p, err := a.projectName()
		if err != nil {
			return err
		}
		if err := c.Do(cmd.Context(), "DELETE", "/api/v1/projects/"+url.PathEscape(p)+"/env/"+url.PathEscape(args[0]), nil, nil); err != nil {
			return classify(err)
		}
		a.progress("unset %s", args[0])
		return nil
	}})
	return cmd
}

func domainsCommand(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "domains", Short: "Custom domains"}
	printDomain := func(d map[string]any) {
		fmt.Fprintf(a.stdout, "%s\tverified=%v\n", d["name"], d["verified"])
		if d["verified"] != true {
			fmt.Fprintln(a.stdout, "create one of these DNS records, then run 'zeitwork domains verify "+str(d["name"])+"':")
			if recs, ok := d["dns_records"].([]any); ok {
				for _, r := range recs {
					m := r.(map[string]any)
					fmt.Fprintf(a.stdout, "  %s\t%s\t%s\n", m["name"], m["type"], m["value"])
				}
			}
			if e := str(d["last_error"]); e != "-" && e != "" {
				fmt.Fprintf(a.stdout, "last check: %s\n", e)
			}
		}
	}
	one := func(use, short, method string, path func(string) (string, error), body func(string) any, okCodes ...int) *cobra.Command {
		return &cobra.Command{Use: use, Short: short, Args: cobra.ExactArgs(1), RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			p, err := path(args[0])
			if err != nil {
				return err
			}
			var b any
			if body != nil {
				b = body(args[0])
			}
			var out map[string]any
			if err := c.Do(cmd.Context(), method, p, b, &out); err != nil {
				return classify(err)
			}
			if method == "DELETE" {
				a.progress("removed %s", args[0])
				return nil
			}
			if a.jsonOut {
				return a.emitJSON(out)
			}
			printDomain(out)
			if strings.HasSuffix(p, "/verify") && out["verified"] != true {
				return &exitError{code: ExitFailure, err: fmt.Errorf("%s is not verified yet", args[0]), hint: "DNS changes can take a while to propagate"}
			}
			return nil
		}}
	}
	cmd.AddCommand(one("add DOMAIN", "Add a custom domain to the project", "POST", func(string) (string, error) {
		p, err := a.projectName()
		return "/api/v1/projects/" + url.PathEscape(p) + "/domains", err
	}, func(d string) any { return map[string]string{"name": d} }))
	cmd.AddCommand(one("verify DOMAIN", "Check the domain's DNS records now", "POST", func(d string) (string, error) {
		return "/api/v1/domains/" + url.PathEscape(d) + "/verify", nil
	}, nil))
	cmd.AddCommand(one("rm DOMAIN", "Remove a custom domain", "DELETE", func(d string) (string, error) {
		return "/api/v1/domains/" + url.PathEscape(d), nil
	}, nil))
	cmd.AddCommand(&cobra.Command{Use: "ls", Short: "List the project's domains", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		p, err := a.projectName()
		if err != nil {
			return err
		}
		var out map[string]any
		if err := c.Do(cmd.Context(), "GET", "/api/v1/projects/"+url.PathEscape(p)+"/domains", nil, &out); err != nil {
			return classify(err)
		}
		if a.jsonOut {
			return a.emitJSON(out)
		}
		var rows [][]string
		for _, d := range asList(out, "domains") {
			rows = append(rows, []string{str(d["name"]), str(d["verified"]), str(d["last_checked_at"])})
		}
		a.table([]string{"DOMAIN", "VERIFIED", "LAST CHECKED"}, rows)
		return nil
	}})
	return cmd
}

func logsCommand(a *app) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{Use: "logs [DEPLOYMENT]", Short: "Show app logs (default: the active deployment)", Args: cobra.MaximumNArgs(1), RunE: func(cmd *cobra.Command, args []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		id := ""
		if len(args) == 1 {
			id = args[0]
		} else {
			p, err := a.projectName()
			if err != nil {
				return err
			}
			var proj map[string]any
			if err := c.Do(cmd.Context(), "GET", "/api/v1/projects/"+url.PathEscape(p), nil, &proj); err != nil {
				return classify(err)
			}
			if proj["active_deployment_id"] == nil {
				return &exitError{code: ExitNotFound, err: errors.New("the project has no active deployment"), hint: "pass a deployment id"}
			}
			id = str(proj["active_deployment_id"])
		}
		f := "0"
		if follow {
			f = "1"
		}
		body, err := c.Stream(cmd.Context(), "/api/v1/deployments/"+url.PathEscape(id)+"/logs?follow="+f)
		if err != nil {
			return classify(err)
		}
		defer body.Close()
		sc := bufio.NewScanner(body)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			if a.jsonOut {
				fmt.Fprintln(a.stdout, sc.Text())
				continue
			}
			var l map[string]any
			if json.Unmarshal(sc.Bytes(), &l) != nil {
				continue
			}
			inst := str(l["instance_id"])
			if len(inst) > 8 {
				inst = inst[len(inst)-8:]
			}
			fmt.Fprintf(a.stdout, "%s %s %s %s\n", str(l["time"]), str(l["region"]), inst, str(l["line"]))
		}
		return nil
	}}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep streaming")
	return cmd
}
