package service

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestVersionFlag(t *testing.T) {
	var out bytes.Buffer
	code := run("zeitwork-test", []string{"--version"}, &out, io.Discard, func(context.Context, *Process) error {
		t.Fatal("run function called for --version")
		return nil
	})
	if code != 0 || !strings.HasPrefix(out.String(), "zeitwork-test ") || !strings.Contains(out.String(), "commit") {
		t.Fatalf("--version: code %d, output %q", code, out.String())
	}
}

func TestRunErrorExitsNonZero(t *testing.T) {
	var errOut bytes.Buffer
	code := run("zeitwork-test", nil, io.Discard, &errOut, func(context.Context, *Process) error {
		return errors.New("invalid configuration: PORT: bad")
	})
	if code != 1 || !strings.Contains(errOut.String(), "invalid configuration: PORT: bad") {
		t.Fatalf("code %d, stderr %q", code, errOut.String())
	}
}

// TestSignals drives the real signal path: SIGHUP reaches Reload, SIGTERM
// ends the context and the process exits 0.
func TestSignals(t *testing.T) {
	done := make(chan int, 1)
	reloaded := make(chan struct{})
	started := make(chan struct{})
	go func() {
		done <- run("zeitwork-test", nil, io.Discard, io.Discard, func(ctx context.Context, p *Process) error {
			close(started)
			select {
			case <-p.Reload:
				close(reloaded)
			case <-time.After(30 * time.Second):
				return errors.New("no reload")
			}
			<-ctx.Done()
			return nil
		})
	}()
	<-started
	deadline := time.After(30 * time.Second)
	for sent := false; !sent; {
		_ = syscall.Kill(syscall.Getpid(), syscall.SIGHUP)
		select {
		case <-reloaded:
			sent = true
		case <-time.After(100 * time.Millisecond):
		case <-deadline:
			t.Fatal("SIGHUP did not reach Reload")
		}
	}
	_ = syscall.Kill(syscall.Getpid(), syscall.SIGTERM)
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit code %d after SIGTERM", code)
		}
	case <-deadline:
		t.Fatal("SIGTERM did not stop the process")
	}
}

func TestHealthEndpoints(t *testing.T) {
	h := NewHealth("zeitwork-test")
	var dbErr error
	h.AddCheck("database", func(context.Context) error { return dbErr })
	h.SetInfo(func() map[string]any { return map[string]any{"algorithm": "round-robin"} })
	mux := http.NewServeMux()
	h.Register(mux, NewRegistry("zeitwork_test"))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() { errc <- Serve(ctx, &http.Server{Handler: mux}, ln, 5*time.Second) }()
	base := "http://" + ln.Addr().String()

	get := func(path string) (int, map[string]any, string) {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var doc map[string]any
		_ = json.Unmarshal(b, &doc)
		return resp.StatusCode, doc, string(b)
	}
	if code, doc, _ := get("/health"); code != 200 || doc["status"] != "healthy" || doc["algorithm"] != "round-robin" {
		t.Fatalf("/health = %d %v", code, doc)
	}
	dbErr = errors.New("connection refused")
	if code, doc, _ := get("/health/ready"); code != 503 || doc["status"] != "unhealthy" || !strings.Contains(doc["reason"].([]any)[0].(string), "database: connection refused") {
		t.Fatalf("/health/ready with failing check = %d %v", code, doc)
	}
	if code, _, _ := get("/health/live"); code != 200 {
		t.Fatalf("/health/live = %d", code)
	}
	if code, _, body := get("/metrics"); code != 200 || !strings.Contains(body, "zeitwork_test_build_info") || !strings.Contains(body, "go_goroutines") || !strings.Contains(body, "process_") {
		t.Fatalf("/metrics = %d, missing series", code)
	}
	dbErr = nil
	h.SetDraining()
	if code, doc, _ := get("/health"); code != 503 || doc["status"] != "draining" {
		t.Fatalf("/health while draining = %d %v", code, doc)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Fatalf("Serve after cancel: %v", err)
	}
}
