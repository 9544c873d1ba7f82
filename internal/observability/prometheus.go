package observability

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Promtool runs Debian's promtool with args and stdin, and returns its
// combined output. A non-zero exit is an error that carries the output.
func Promtool(ctx context.Context, stdin io.Reader, args ...string) ([]byte, error) {
	bin, err := exec.LookPath("promtool")
	if err != nil {
		return nil, fmt.Errorf("promtool not found (Debian package prometheus; make deps installs it): %w", err)
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdin = stdin
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("promtool %v: %w\n%s", args, err, out)
	}
	return out, nil
}

// Prometheus is a Prometheus server (Debian's prometheus binary) started
// on loopback with a configuration of the caller's, storing into a
// directory of its own.
type Prometheus struct {
	URL  string // http://127.0.0.1:port
	cmd  *exec.Cmd
	done chan struct{}
	log  string
	err  error
}

// StartPrometheus writes nothing: configFile must exist (its relative
// paths resolve against its directory). It returns once /-/ready answers.
func StartPrometheus(ctx context.Context, configFile, dataDir, logFile string) (*Prometheus, error) {
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		return nil, fmt.Errorf("prometheus not found (Debian package prometheus; make deps installs it): %w", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	logf, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "--config.file="+configFile, "--storage.tsdb.path="+dataDir,
		"--web.listen-address="+addr, "--log.level=warn", "--storage.tsdb.retention.time=1d")
	cmd.Dir = filepath.Dir(configFile)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("cannot start prometheus: %w", err)
	}
	p := &Prometheus{URL: "http://" + addr, cmd: cmd, done: make(chan struct{}), log: logFile}
	go func() { // owned by p: ends when the process exits
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if resp, err := client.Get(p.URL + "/-/ready"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p, nil
			}
		}
		select {
		case <-p.done:
			b, _ := os.ReadFile(logFile)
			return nil, fmt.Errorf("prometheus exited during start-up (%v): %s", p.err, b)
		case <-ctx.Done():
			p.Stop()
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, errors.New("prometheus did not become ready within 2 minutes")
		}
	}
}

// Stop terminates the server and waits for it.
func (p *Prometheus) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// Sample is one element of an instant query's vector result.
type Sample struct {
	Metric map[string]string
	Value  float64
}

// Query runs an instant PromQL query through the HTTP API. A query the
// server rejects (syntax, type) is an error; the result is a vector (a
// scalar becomes a one-element vector).
func (p *Prometheus) Query(ctx context.Context, expr string) ([]Sample, error) {
	status, body, err := fetch(ctx, p.URL+"/api/v1/query?"+url.Values{"query": {expr}}.Encode())
	if err != nil {
		return nil, err
	}
	var doc struct {
		Status    string `json:"status"`
		ErrorType string `json:"errorType"`
		Error     string `json:"error"`
		Data      struct {
			ResultType string          `json:"resultType"`
			Result     json.RawMessage `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, fmt.Errorf("query %q: %d %s", expr, status, bytes.TrimSpace(body))
	}
	if doc.Status != "success" {
		return nil, fmt.Errorf("query %q: %s: %s", expr, doc.ErrorType, doc.Error)
	}
	parse := func(v [2]any) (float64, error) {
		s, _ := v[1].(string)
		return strconv.ParseFloat(s, 64)
	}
	switch doc.Data.ResultType {
	case "vector":
		var vec []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		}
		if err := json.Unmarshal(doc.Data.Result, &vec); err != nil {
			return nil, err
		}
		out := make([]Sample, 0, len(vec))
		for _, s := range vec {
			f, err := parse(s.Value)
			if err != nil {
				return nil, err
			}
			out = append(out, Sample{Metric: s.Metric, Value: f})
		}
		return out, nil
	case "scalar":
		var v [2]any
		if err := json.Unmarshal(doc.Data.Result, &v); err != nil {
			return nil, err
		}
		f, err := parse(v)
		if err != nil {
			return nil, err
		}
		return []Sample{{Value: f}}, nil
	default:
		return nil, fmt.Errorf("query %q: result type %s", expr, doc.Data.ResultType)
	}
}

// fetch GETs u and returns the status and the body (at most 16 MiB).
func fetch(ctx context.Context, u string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	return resp.StatusCode, body, err
}

// Target is one entry of /api/v1/targets.
type Target struct {
	Job       string
	ScrapeURL string
	Labels    map[string]string
	Health    string
	LastError string
}

// Targets lists the active scrape targets.
func (p *Prometheus) Targets(ctx context.Context) ([]Target, error) {
	_, body, err := fetch(ctx, p.URL+"/api/v1/targets?state=active")
	if err != nil {
		return nil, err
	}
	var doc struct {
		Data struct {
			ActiveTargets []struct {
				ScrapePool string            `json:"scrapePool"`
				ScrapeURL  string            `json:"scrapeUrl"`
				Labels     map[string]string `json:"labels"`
				Health     string            `json:"health"`
				LastError  string            `json:"lastError"`
			} `json:"activeTargets"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, err
	}
	var out []Target
	for _, t := range doc.Data.ActiveTargets {
		out = append(out, Target{Job: t.ScrapePool, ScrapeURL: t.ScrapeURL, Labels: t.Labels, Health: t.Health, LastError: t.LastError})
	}
	return out, nil
}

// RuleHealth lists every loaded rule whose last evaluation failed, as
// "group/name: error".
func (p *Prometheus) RuleHealth(ctx context.Context) (rules int, bad []string, err error) {
	_, body, err := fetch(ctx, p.URL+"/api/v1/rules")
	if err != nil {
		return 0, nil, err
	}
	var doc struct {
		Data struct {
			Groups []struct {
				Name  string `json:"name"`
				Rules []struct {
					Name       string `json:"name"`
					Health     string `json:"health"`
					LastError  string `json:"lastError"`
					Evaluation string `json:"lastEvaluation"`
				} `json:"rules"`
			} `json:"groups"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return 0, nil, err
	}
	for _, g := range doc.Data.Groups {
		for _, r := range g.Rules {
			rules++
			if r.Health != "ok" {
				bad = append(bad, fmt.Sprintf("%s/%s: %s %s", g.Name, r.Name, r.Health, r.LastError))
			}
		}
	}
	return rules, bad, nil
}

// CheckMetrics runs `promtool check metrics` on a scrape. Lint problems
// (naming, help, suffixes) come back one per line; err is set when
// promtool could not run or could not parse the exposition at all.
func CheckMetrics(ctx context.Context, body []byte) (problems []string, err error) {
	bin, err := exec.LookPath("promtool")
	if err != nil {
		return nil, fmt.Errorf("promtool not found (Debian package prometheus; make deps installs it): %w", err)
	}
	cmd := exec.CommandContext(ctx, bin, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	out, runErr := cmd.CombinedOutput()
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			problems = append(problems, l)
		}
	}
	var ee *exec.ExitError
	switch {
	case runErr == nil:
		return problems, nil
	case errors.As(runErr, &ee) && ee.ExitCode() == 3: // lint problems only
		return problems, nil
	default:
		return problems, fmt.Errorf("promtool check metrics: %w: %s", runErr, out)
	}
}
