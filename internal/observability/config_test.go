package observability

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v4"
)

// kit is deployments/observability, relative to this package.
const kit = "../../deployments/observability"

func needPromtool(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Fatal("promtool is missing: install Debian's prometheus package (make deps)")
	}
}

// TestPrometheusConfig runs promtool on the shipped configuration: the
// config with its targets files, the alert rules, and their unit tests.
func TestPrometheusConfig(t *testing.T) {
	needPromtool(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := Promtool(ctx, nil, "check", "config", filepath.Join(kit, "prometheus.yml")); err != nil {
		t.Error(err)
	}
	rules, _ := filepath.Glob(filepath.Join(kit, "rules", "*.yml"))
	if len(rules) == 0 {
		t.Fatal("no rule files")
	}
	if _, err := Promtool(ctx, nil, append([]string{"check", "rules"}, rules...)...); err != nil {
		t.Error(err)
	}
	tests, _ := filepath.Glob(filepath.Join(kit, "tests", "*.yml"))
	if len(tests) == 0 {
		t.Fatal("no rule tests")
	}
	if out, err := Promtool(ctx, nil, append([]string{"test", "rules"}, tests...)...); err != nil {
		t.Error(err)
	} else if !strings.Contains(string(out), "SUCCESS") {
		t.Errorf("promtool test rules: %s", out)
	}
	for _, f := range []string{"operators.json", "edge-proxies.json", "load-balancers.json", "nodes.json", "dns.json"} {
		b, err := os.ReadFile(filepath.Join(kit, "targets", f))
		if err != nil {
			t.Fatal(err)
		}
		var groups []struct {
			Targets []string          `json:"targets"`
			Labels  map[string]string `json:"labels"`
		}
		if err := json.Unmarshal(b, &groups); err != nil || len(groups) == 0 {
			t.Errorf("%s: %v (%d groups)", f, err, len(groups))
		}
		for _, g := range groups {
			if _, ok := g.Labels["region"]; ok == (f == "operators.json" || f == "dns.json") {
				t.Errorf("%s: region label %v (operators and GeoDNS servers must have none, the others one)", f, g.Labels)
			}
		}
	}
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

type ruleTests struct {
	Tests []struct {
		AlertRuleTest []struct {
			Alertname string `yaml:"alertname"`
			ExpAlerts []any  `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
	} `yaml:"tests"`
}

func loadAlerts(t *testing.T) (map[string]map[string]string, ruleFile) {
	t.Helper()
	alerts := map[string]map[string]string{}
	var all ruleFile
	files, _ := filepath.Glob(filepath.Join(kit, "rules", "*.yml"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var rf ruleFile
		if err := yaml.Unmarshal(b, &rf); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		all.Groups = append(all.Groups, rf.Groups...)
		for _, g := range rf.Groups {
			for _, r := range g.Rules {
				if r.Alert != "" {
					alerts[r.Alert] = r.Annotations
					if r.Labels["severity"] == "" {
						t.Errorf("alert %s has no severity", r.Alert)
					}
				}
			}
		}
	}
	return alerts, all
}

// TestEveryAlertIsTested requires, for every alert, a unit test case where
// it fires and one where it does not, and a runbook link to a section that
// exists in docs/operations.md.
func TestEveryAlertIsTested(t *testing.T) {
	alerts, _ := loadAlerts(t)
	if len(alerts) == 0 {
		t.Fatal("no alerts")
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	files, _ := filepath.Glob(filepath.Join(kit, "tests", "*.yml"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var rt ruleTests
		if err := yaml.Unmarshal(b, &rt); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, tc := range rt.Tests {
			for _, a := range tc.AlertRuleTest {
				if _, ok := alerts[a.Alertname]; !ok {
					t.Errorf("%s tests unknown alert %s", filepath.Base(f), a.Alertname)
				}
				if len(a.ExpAlerts) > 0 {
					fires[a.Alertname] = true
				} else {
					quiet[a.Alertname] = true
				}
			}
		}
	}
	anchors := docAnchors(t, "../../docs/operations.md")
	for name, ann := range alerts {
		if !fires[name] {
			t.Errorf("alert %s: no test case where it fires", name)
		}
		if !quiet[name] {
			t.Errorf("alert %s: no test case where it stays quiet", name)
		}
		u := ann["runbook_url"]
		_, anchor, ok := strings.Cut(u, "docs/operations.md#")
		if !ok || !anchors[anchor] {
			t.Errorf("alert %s: runbook_url %q does not point at a section of docs/operations.md", name, u)
		}
		if ann["summary"] == "" {
			t.Errorf("alert %s has no summary", name)
		}
	}
}

// docAnchors returns GitHub's anchors of the Markdown headings in path.
func docAnchors(t *testing.T, path string) map[string]bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]bool{}
	strip := regexp.MustCompile(`[^\p{L}\p{N}\- _]`)
	sc := bufio.NewScanner(f)
	inCode := false
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "```") {
			inCode = !inCode
		}
		if inCode || !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.TrimSpace(strings.TrimLeft(line, "#"))
		h = strings.ToLower(strip.ReplaceAllString(h, ""))
		out[strings.ReplaceAll(h, " ", "-")] = true
	}
	return out
}

// TestDashboardsWellFormed checks the Grafana JSON the way provisioning
// needs it: unique uids, unique panel ids per dashboard, every panel on
// the ${datasource} variable and with a PromQL target, every variable
// query-able.
func TestDashboardsWellFormed(t *testing.T) {
	ds, err := LoadDashboards(filepath.Join(kit, "grafana", "dashboards"))
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) < 3 {
		t.Fatalf("%d dashboards, want the overview, region and deployment ones", len(ds))
	}
	uids := map[string]bool{}
	for _, d := range ds {
		if d.UID == "" || uids[d.UID] || d.Title == "" {
			t.Errorf("%s: uid %q title %q (unique uid and a title required)", d.File, d.UID, d.Title)
		}
		uids[d.UID] = true
		ids := map[int]bool{}
		vars := map[string]bool{"__rate_interval": true, "__interval": true}
		for _, v := range d.Templating.List {
			vars[v.Name] = true
		}
		if !vars["datasource"] {
			t.Errorf("%s: no datasource variable", d.File)
		}
		for _, p := range d.AllPanels() {
			if ids[p.ID] {
				t.Errorf("%s: panel id %d twice", d.File, p.ID)
			}
			ids[p.ID] = true
			if p.Type == "row" {
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" || len(p.Targets) == 0 {
				t.Errorf("%s: panel %q needs the ${datasource} data source and a target", d.File, p.Title)
			}
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("%s: panel %q target %s has no expression", d.File, p.Title, tg.RefID)
				}
				for _, m := range varRE.FindAllStringSubmatch(tg.Expr, -1) {
					if !vars[m[1]+m[2]] {
						t.Errorf("%s: panel %q uses undefined variable %s", d.File, p.Title, m[0])
					}
				}
			}
		}
		qs, err := d.Queries()
		if err != nil {
			t.Error(err)
		}
		for _, q := range qs {
			if strings.Contains(q.Expr, "label_values") {
				t.Errorf("%s: %s: label_values not understood", d.File, q.Where)
			}
		}
	}
}

func TestExpand(t *testing.T) {
	got, err := Expand(`rate(x{region=~"$region", d="${deployment}"}[$__rate_interval]) $regionx`, map[string]string{
		"region": "a|b", "deployment": "d1", "__rate_interval": "1m", "regionx": "z"})
	if err != nil || got != `rate(x{region=~"a|b", d="d1"}[1m]) z` {
		t.Errorf("Expand = %q, %v", got, err)
	}
	if _, err := Expand("$nope", nil); err == nil {
		t.Error("a variable without a value expanded")
	}
}

// TestJournaldDropIn checks the shipped journald configuration against
// the keys journald knows (its commented defaults in
// /etc/systemd/journald.conf) and the value syntax of sizes and spans.
func TestJournaldDropIn(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(kit, "journald", "zeitwork.conf"))
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	if def, err := os.ReadFile("/etc/systemd/journald.conf"); err == nil {
		for _, l := range strings.Split(string(def), "\n") {
			if k, _, ok := strings.Cut(strings.TrimPrefix(l, "#"), "="); ok && !strings.Contains(k, " ") {
				known[k] = true
			}
		}
	}
	size := regexp.MustCompile(`^[0-9]+[KMGTPE]?$`)
	section := ""
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if strings.HasPrefix(l, "[") {
			section = l
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok || section != "[Journal]" {
			t.Errorf("line %q outside [Journal] or without a value", l)
			continue
		}
		if len(known) > 0 && !known[k] {
			t.Errorf("journald does not know %s", k)
		}
		switch {
		case strings.HasSuffix(k, "Use") || strings.HasSuffix(k, "Free") || strings.HasSuffix(k, "FileSize"):
			if !size.MatchString(v) {
				t.Errorf("%s=%s is not a size", k, v)
			}
		case strings.HasSuffix(k, "Sec"):
			if _, err := exec.LookPath("systemd-analyze"); err == nil {
				if out, err := exec.Command("systemd-analyze", "timespan", v).CombinedOutput(); err != nil {
					t.Errorf("%s=%s: %s", k, v, out)
				}
			}
		}
	}
}
