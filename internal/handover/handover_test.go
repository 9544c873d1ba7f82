package handover

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The test binary doubles as the new process: with HANDOVER_TEST_CHILD set
// it runs child instead of the tests.
func TestMain(m *testing.M) {
	if mode := os.Getenv("HANDOVER_TEST_CHILD"); mode != "" {
		os.Exit(child(mode))
	}
	os.Exit(m.Run())
}

// child takes the listener "http", answers "child" on it and says ready;
// mode "exit" fails at once and "silent" never says ready.
func child(mode string) int {
	switch mode {
	case "exit":
		return 3
	case "silent":
		time.Sleep(time.Minute)
		return 0
	}
	h, err := New(slog.New(slog.DiscardHandler))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if h.Inherited("http") != 1 {
		fmt.Fprintln(os.Stderr, "listener not inherited")
		return 1
	}
	ln, err := h.Listen("http", func() (net.Listener, error) { return nil, errors.New("must be inherited") })
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	srv := serve(ln, "child")
	if err := h.Ready(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	srv.stop()
	return 0
}

// server answers every request with its body and closes the connection.
// stop is a complete drain: no new connections, every accepted one
// answered. (net/http's Shutdown drops a connection whose request it
// reads after the shutdown began, which is not what is tested here.)
type server struct {
	ln   net.Listener
	wg   sync.WaitGroup
	done chan struct{}
}

func serve(ln net.Listener, body string) *server {
	s := &server{ln: ln, done: make(chan struct{})}
	go func() { // ends when ln is closed by stop
		defer close(s.done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				req.Body.Close()
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
			})
		}
	}()
	return s
}

func (s *server) stop() {
	s.ln.Close()
	<-s.done
	s.wg.Wait()
}

func newParent(t *testing.T) (*Handover, net.Listener, *server) {
	t.Helper()
	h, err := New(slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	h.args = []string{"-test.run=^$"}
	h.ReadyTimeout = 20 * time.Second
	ln, err := h.ListenGated("http", func() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") })
	if err != nil {
		t.Fatal(err)
	}
	srv := serve(ln, "parent")
	t.Cleanup(srv.stop)
	return h, ln, srv
}

func get(c *http.Client, url string) (string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestUpgradeUnderLoad: clients opening a new connection per request
// while the listener moves to a new process see no error, and after the
// old process stops accepting every answer comes from the new one.
func TestUpgradeUnderLoad(t *testing.T) {
	t.Setenv("HANDOVER_TEST_CHILD", "serve")
	h, ln, srv := newParent(t)
	url := "http://" + ln.Addr().String() + "/"
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

	var (
		wg                    sync.WaitGroup
		stop                  atomic.Bool
		ok, failed            atomic.Int64
		fromParent, fromChild atomic.Int64
		firstErr              atomic.Value
	)
	deadline := time.Now().Add(60 * time.Second)
	for range 4 {
		wg.Go(func() {
			for n := 0; n < 100_000 && !stop.Load() && time.Now().Before(deadline); n++ {
				body, err := get(client, url)
				switch {
				case err != nil:
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				case body == "parent":
					fromParent.Add(1)
				case body == "child":
					fromChild.Add(1)
				}
				ok.Add(1)
			}
		})
	}
	time.Sleep(200 * time.Millisecond)
	pid, err := h.Upgrade(t.Context())
	if err != nil {
		stop.Store(true)
		wg.Wait()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(pid, syscall.SIGTERM)
		var ws syscall.WaitStatus
		_, _ = syscall.Wait4(pid, &ws, 0, nil)
	})
	// The old process stops accepting, as the edge does: its accept loop
	// goes on (a server would take its end for the start of its drain)
	// while every new connection reaches the new process.
	h.StopAccepting()
	afterStop := fromParent.Load()
	time.Sleep(300 * time.Millisecond)
	select {
	case <-srv.done:
		t.Fatal("the accept loop ended at StopAccepting, before Close")
	default:
	}
	if n := fromParent.Load() - afterStop; n > 4 { // at most one in flight per client
		t.Fatalf("%d answers from the old process after StopAccepting", n)
	}
	// Then it drains.
	srv.stop()
	before := fromChild.Load()
	time.Sleep(500 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	t.Logf("requests: %d (parent %d, child %d), failed %d", ok.Load(), fromParent.Load(), fromChild.Load(), failed.Load())
	if failed.Load() > 0 {
		t.Fatalf("%d requests failed during the handover, first: %v", failed.Load(), firstErr.Load())
	}
	if fromParent.Load() == 0 || fromChild.Load() == before {
		t.Fatalf("want answers from both processes and the child after the parent stopped: parent %d, child %d (%d before the stop)", fromParent.Load(), fromChild.Load(), before)
	}
	// After the parent closed its copy, the socket is the child's alone.
	for range 20 {
		if body, err := get(client, url); err != nil || body != "child" {
			t.Fatalf("after the handover: %q %v", body, err)
		}
	}
}

// TestUpgradeFails: a new process that exits or never says ready is
// reported and gone, and the old one keeps its listener.
func TestUpgradeFails(t *testing.T) {
	for _, mode := range []string{"exit", "silent"} {
		t.Run(mode, func(t *testing.T) {
			t.Setenv("HANDOVER_TEST_CHILD", mode)
			h, ln, _ := newParent(t)
			h.ReadyTimeout = 2 * time.Second
			start := time.Now()
			pid, err := h.Upgrade(t.Context())
			if err == nil {
				t.Fatalf("upgrade to a %s process succeeded (pid %d)", mode, pid)
			}
			t.Logf("%s: %v (after %s)", mode, err, time.Since(start).Round(time.Millisecond))
			want := map[string]string{"exit": "ended before it was ready", "silent": "not ready within"}[mode]
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("error %q does not say %q", err, want)
			}
			client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			if body, err := get(client, "http://"+ln.Addr().String()+"/"); err != nil || body != "parent" {
				t.Fatalf("old process after a failed upgrade: %q %v", body, err)
			}
		})
	}
}

func TestParseEnv(t *testing.T) {
	for _, tc := range []struct {
		fds, ready string
		keys       int
		err        string
	}{
		{"a,b,a", "6", 3, ""},
		{"", "3", 0, ""},
		{"a,b", "4", 0, "want descriptor 5"},
		{"a,,b", "6", 0, "invalid listener key"},
		{"a", "x", 0, "want descriptor 4"},
	} {
		keys, rfd, err := parseEnv(tc.fds, tc.ready)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("parseEnv(%q, %q) = %v, want error with %q", tc.fds, tc.ready, err, tc.err)
			}
			continue
		}
		if err != nil || len(keys) != tc.keys || rfd != 3+tc.keys {
			t.Errorf("parseEnv(%q, %q) = %v %d %v", tc.fds, tc.ready, keys, rfd, err)
		}
	}
}

func FuzzParseEnv(f *testing.F) {
	f.Add("edge:127.0.0.1:443,edge:127.0.0.1:8083", "5")
	f.Add("", "3")
	f.Add("a,,", "x")
	f.Fuzz(func(t *testing.T, fds, ready string) {
		keys, rfd, err := parseEnv(fds, ready)
		if err != nil {
			return
		}
		if rfd != 3+len(keys) {
			t.Fatalf("ready descriptor %d with %d keys", rfd, len(keys))
		}
		for _, k := range keys {
			if k == "" || strings.ContainsAny(k, "\x00\n") {
				t.Fatalf("accepted key %q", k)
			}
		}
	})
}
