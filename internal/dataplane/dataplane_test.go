package dataplane

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/httpjson"
)

const token = "s3cret-token"

// backend is a plain HTTP app standing in for a VM: it reports what it
// received, streams on /stream and echoes lines over an upgraded
// connection on /echo.
func backend(t *testing.T, release <-chan struct{}) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("/report", func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]any{"host": r.Host, "headers": r.Header, "path": r.URL.RequestURI()})
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "chunk 0\n")
		w.(http.Flusher).Flush()
		select { // the client must see chunk 0 before the response ends
		case <-release:
		case <-r.Context().Done():
		}
		fmt.Fprint(w, "chunk 1\n")
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "zw-echo" {
			http.Error(w, "want upgrade", 400)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		fmt.Fprint(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: zw-echo\r\n\r\n")
		_ = brw.Flush()
		for {
			line, err := brw.ReadString('\n')
			if err != nil {
				return
			}
			fmt.Fprint(brw, line)
			_ = brw.Flush()
		}
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

type fixture struct {
	t     *testing.T
	paths Paths
	s     *Server
	front *httptest.Server
}

func newFixture(t *testing.T) *fixture {
	dir := t.TempDir()
	p := PathsFor(dir)
	s := New(Config{Token: token, TablePath: p.Table, AgentSocket: p.AgentSocket, Poll: 10 * time.Millisecond}, slog.New(slog.DiscardHandler))
	f := &fixture{t: t, paths: p, s: s, front: httptest.NewServer(s.Handler())}
	t.Cleanup(f.front.Close)
	return f
}

func (f *fixture) write(routes map[string]Route) {
	f.t.Helper()
	if err := WriteTable(f.paths.Table, Table{NodeID: "n1", WrittenAt: time.Now(), Instances: routes}); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fixture) get(path, instance, tok string, hdr ...string) (int, http.Header, string) {
	f.t.Helper()
	req, _ := http.NewRequest("GET", f.front.URL+path, nil)
	req.Host = "web-abc1234-acme.zeitwork.test"
	if instance != "" {
		req.Header.Set(HeaderInstance, instance)
		req.Header.Set(HeaderToken, tok)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b)
}

// errCode extracts the API error code of a JSON error body.
func errCode(body string) string {
	var e httpjson.ErrorBody
	_ = json.Unmarshal([]byte(body), &e)
	return e.Error.Code
}

// TestProxy: instance requests reach the right backend with the contract's
// headers, are refused without the token, and get 404/503/502 for unknown,
// not running and unreachable instances.
func TestProxy(t *testing.T) {
	release := make(chan struct{})
	app := backend(t, release)
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	f := newFixture(t)
	f.write(map[string]Route{
		"i1":   {State: "running", Addr: app.Listener.Addr().String()},
		"boot": {State: "starting"},
		"gone": {State: "running", Addr: deadAddr},
	})
	if err := f.s.Reload(); err != nil {
		t.Fatal(err)
	}

	code, _, body := f.get("/report?q=1", "i1", token, "X-Forwarded-For", "203.0.113.7", "X-Forwarded-Proto", "https")
	if code != 200 {
		t.Fatalf("proxied: %d %s", code, body)
	}
	var rep struct {
		Host    string
		Headers http.Header
		Path    string
	}
	if err := json.Unmarshal([]byte(body), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Host != "web-abc1234-acme.zeitwork.test" || rep.Path != "/report?q=1" || rep.Headers.Get(HeaderInstance) != "" ||
		rep.Headers.Get(HeaderToken) != "" || rep.Headers.Get("X-Forwarded-For") != "203.0.113.7" || rep.Headers.Get("X-Forwarded-Proto") != "https" {
		t.Fatalf("the app received %+v", rep)
	}
	for _, tc := range []struct {
		name, id, tok string
		code          int
		errCode       string
	}{
		{"no token", "i1", "", 401, "unauthorized"},
		{"wrong token", "i1", token + "x", 401, "unauthorized"},
		{"unknown instance", "nope", token, 404, "not_found"},
		{"not running", "boot", token, 503, "unavailable"},
		{"VM not answering", "gone", token, 502, "bad_gateway"},
	} {
		code, h, body := f.get("/", tc.id, tc.tok)
		if code != tc.code || errCode(body) != tc.errCode {
			t.Errorf("%s: %d %s, want %d %s", tc.name, code, body, tc.code, tc.errCode)
		}
		if tc.code == 503 && h.Get("Retry-After") == "" {
			t.Errorf("%s: no Retry-After", tc.name)
		}
	}

	// Streaming: the first chunk arrives while the app holds the response.
	req, _ := http.NewRequest("GET", f.front.URL+"/stream", nil)
	req.Header.Set(HeaderInstance, "i1")
	req.Header.Set(HeaderToken, token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); line != "chunk 0\n" || err != nil {
		t.Fatalf("first chunk: %q %v (buffered by the proxy?)", line, err)
	}
	close(release)
	if rest, _ := io.ReadAll(br); string(rest) != "chunk 1\n" {
		t.Fatalf("rest of the stream: %q", rest)
	}
	resp.Body.Close()

	// Upgrade: bytes pass both ways.
	c, err := net.Dial("tcp", f.front.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: zw-echo\r\n%s: i1\r\n%s: %s\r\n\r\n", HeaderInstance, HeaderToken, token)
	cr := bufio.NewReader(c)
	up, err := http.ReadResponse(cr, nil)
	if err != nil || up.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", up, err)
	}
	for _, msg := range []string{"ping\n", "pong\n"} {
		fmt.Fprint(c, msg)
		if got, err := cr.ReadString('\n'); got != msg || err != nil {
			t.Fatalf("echo: %q %v", got, err)
		}
	}

	if n := counter(t, f.s, "zeitwork_dataplane_proxied_requests_total", "2xx"); n < 2 {
		t.Errorf("2xx proxied counted %v times", n)
	}
}

// TestTableReload: a malformed table, or one of an unknown format, keeps
// the last good one serving; Run follows the file.
func TestTableReload(t *testing.T) {
	app := backend(t, nil)
	f := newFixture(t)
	if code, _, _ := f.get("/report", "i1", token); code != 404 {
		t.Fatalf("before any table: %d", code)
	}
	f.write(map[string]Route{"i1": {State: "running", Addr: app.Listener.Addr().String()}})
	if err := f.s.Reload(); err != nil {
		t.Fatal(err)
	}
	if code, _, body := f.get("/report", "i1", token); code != 200 {
		t.Fatalf("after the first table: %d %s", code, body)
	}

	for _, bad := range []string{`{"format":1,"instances":`, `{"format":99,"instances":{}}`, `{"format":1}`,
		`{"format":1,"instances":{"i1":{"state":"running","addr":"no-port"}}}`} {
		if err := os.WriteFile(f.paths.Table+".tmp", []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(f.paths.Table+".tmp", f.paths.Table); err != nil {
			t.Fatal(err)
		}
		if err := f.s.Reload(); err == nil {
			t.Fatalf("table %s accepted", bad)
		}
		if code, _, body := f.get("/report", "i1", token); code != 200 {
			t.Fatalf("after bad table %s: %d %s", bad, code, body)
		}
	}
	if n := counter(t, f.s, "zeitwork_dataplane_table_reloads_total", "error"); n != 4 {
		t.Errorf("failed reloads counted %v, want 4", n)
	}
	// Run follows the file: a good table after bad ones is taken; a
	// stopping instance is 503.
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { _ = f.s.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	f.write(map[string]Route{"i1": {State: "stopping"}, "i2": {State: "running", Addr: app.Listener.Addr().String()}})
	waitCode(t, f, "i1", 503)
	waitCode(t, f, "i2", 200)
	f.write(nil)
	waitCode(t, f, "i2", 404)
}

func waitCode(t *testing.T, f *fixture, id string, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, _, body := f.get("/report", id, token)
		if code == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance %s: %d %s, want %d", id, code, body, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestAgentForwarding: everything that is not for an instance goes to the
// agent's socket; without an agent it is 503 agent_unavailable, while the
// data plane's own health still answers.
func TestAgentForwarding(t *testing.T) {
	f := newFixture(t)
	code, h, body := f.get("/health/live", "", "")
	if code != 503 || errCode(body) != "agent_unavailable" || h.Get("Retry-After") == "" {
		t.Fatalf("agent down: %d %v %s", code, h, body)
	}
	if code, _, body := f.get("/dataplane/health", "", ""); code != 200 || !strings.Contains(body, `"status":"alive"`) {
		t.Fatalf("own health: %d %s", code, body)
	}
	if code, _, body := f.get("/dataplane/metrics", "", ""); code != 200 || !strings.Contains(body, "zeitwork_dataplane_build_info") {
		t.Fatalf("own metrics: %d %s", code, body)
	}

	ln, err := net.Listen("unix", f.paths.AgentSocket)
	if err != nil {
		t.Fatal(err)
	}
	agent := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "agent %s %s auth=%s host=%s", r.Method, r.URL.RequestURI(), r.Header.Get("Authorization"), r.Host)
	})}
	go func() { _ = agent.Serve(ln) }()
	t.Cleanup(func() { _ = agent.Close() })
	code, _, body = f.get("/instances?x=1", "", "", "Authorization", "Bearer tok")
	if code != 200 || body != "agent GET /instances?x=1 auth=Bearer tok host=web-abc1234-acme.zeitwork.test" {
		t.Fatalf("through to the agent: %d %q", code, body)
	}
	_ = agent.Close()
	if code, _, body := f.get("/instances", "", ""); code != 503 || errCode(body) != "agent_unavailable" {
		t.Fatalf("agent gone again: %d %s", code, body)
	}
}

// counter returns the value of a counter with one label value.
func counter(t *testing.T, s *Server, name, label string) float64 {
	t.Helper()
	mfs, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == label {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func TestPaths(t *testing.T) {
	p := PathsFor("/var/lib/zeitwork")
	if p.Table != filepath.Join("/var/lib/zeitwork", "dataplane", "table.json") || p.AgentSocket != "/var/lib/zeitwork/agent.sock" {
		t.Fatalf("%+v", p)
	}
}

// TestProcessStart: this process started before now and after boot.
func TestProcessStart(t *testing.T) {
	st, ok := processStart(os.Getpid())
	if !ok || st.After(time.Now().Add(time.Second)) || time.Since(st) > time.Hour {
		t.Fatalf("processStart = %v %v", st, ok)
	}
}
