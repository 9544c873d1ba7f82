package dataplane

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/buildinfo"
)

// TestMain doubles as the data plane process: Ensure starts this test
// binary with `dataplane serve` and DATAPLANE_TEST_HELPER=1.
func TestMain(m *testing.M) {
	if os.Getenv("DATAPLANE_TEST_HELPER") == "1" {
		if v := os.Getenv("DATAPLANE_TEST_VERSION"); v != "" {
			buildinfo.Version = v
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
		err := Serve(ctx, ProcessConfig{WorkDir: os.Getenv("DATAPLANE_TEST_WORKDIR"), Addr: os.Getenv("DATAPLANE_TEST_ADDR"),
			Token: token, Drain: 5 * time.Second}, slog.New(slog.NewJSONHandler(os.Stderr, nil)))
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestProcessLifecycle runs real data plane processes: Ensure starts one
// with the listener it opened; a newer build replaces it while requests
// keep succeeding; the same build is kept; a dead one is replaced, a hung
// one killed and replaced; Stop leaves nothing listening.
func TestProcessLifecycle(t *testing.T) {
	app := backend(t, nil)
	dir := t.TempDir()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := free.Addr().String()
	free.Close()
	if err := WriteTable(PathsFor(dir).Table, Table{Instances: map[string]Route{"i1": {State: "running", Addr: app.Listener.Addr().String()}}}); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), "DATAPLANE_TEST_HELPER=1", "DATAPLANE_TEST_WORKDIR="+dir, "DATAPLANE_TEST_ADDR="+addr)
	sp := Spawn{WorkDir: dir, Addr: addr, Exe: exe, Env: append(env, "DATAPLANE_TEST_VERSION=old"), Log: slog.New(slog.DiscardHandler)}
	t.Cleanup(func() {
		if err := Stop(dir, time.Second); err != nil {
			t.Error(err)
		}
	})
	ctx := t.Context()
	client := &http.Client{Timeout: 5 * time.Second}
	get := func() error {
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/report", nil)
		req.Header.Set(HeaderInstance, "i1")
		req.Header.Set(HeaderToken, token)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}

	old, started, err := Ensure(ctx, sp, true)
	if err != nil || !started {
		t.Fatalf("first Ensure: %d %v %v\n%s", old, started, err, tail(PathsFor(dir).Log, 20))
	}
	if err := get(); err != nil {
		t.Fatalf("through the first data plane: %v", err)
	}
	if got := RunningPID(dir); got != old {
		t.Fatalf("RunningPID = %d, want %d", got, old)
	}

	// Upgrade: this build replaces the "old" one; traffic never stops.
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	hammered := make(chan struct{})
	go func() {
		defer close(hammered)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := get(); err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			} else {
				ok.Add(1)
			}
		}
	}()
	sp.Env = env
	cur, started, err := Ensure(ctx, sp, true)
	if err != nil || !started || cur == old {
		t.Fatalf("upgrade Ensure: %d %v %v", cur, started, err)
	}
	if !waitGone(old, 10*time.Second) {
		t.Fatalf("the replaced data plane %d did not exit", old)
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	<-hammered
	if failed.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("during the hand-over: %d ok, %d failed (%v)", ok.Load(), failed.Load(), firstErr.Load())
	}
	if again, started, err := Ensure(ctx, sp, true); err != nil || started || again != cur {
		t.Fatalf("Ensure with the same build: %d %v %v, want %d kept", again, started, err, cur)
	}

	// Died: a new one is started even without replaceHung (Keep's case).
	_ = syscall.Kill(cur, syscall.SIGKILL)
	waitGone(cur, 5*time.Second)
	next, started, err := Ensure(ctx, sp, false)
	if err != nil || !started || next == cur {
		t.Fatalf("after a crash: %d %v %v", next, started, err)
	}
	if err := get(); err != nil {
		t.Fatal(err)
	}

	// Hung: left alone by Keep's check, killed and replaced at agent start.
	_ = syscall.Kill(next, syscall.SIGSTOP)
	// kill returns before every thread has stopped: under load another
	// thread could still answer a ping. Wait for the group stop.
	waitStopped(t, next, 5*time.Second)
	if got, started, _ := Ensure(ctx, sp, false); started || got != next {
		t.Fatalf("a hung data plane was replaced by a periodic check: %d %v", got, started)
	}
	fresh, started, err := Ensure(ctx, sp, true)
	if err != nil || !started || fresh == next {
		t.Fatalf("hung: %d %v %v", fresh, started, err)
	}
	if err := get(); err != nil {
		t.Fatal(err)
	}

	if err := Stop(dir, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if RunningPID(dir) != 0 {
		t.Fatal("data plane still running after Stop")
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatal("something still listens on the node's port after Stop")
	}
}

// waitStopped waits until every thread of pid is stopped (state T).
func waitStopped(t *testing.T, pid int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		if err != nil || len(tasks) == 0 {
			t.Fatalf("process %d: no threads (%v)", pid, err)
		}
		stopped := 0
		for _, task := range tasks {
			if st, _ := os.ReadFile(task); procState(st) == 'T' {
				stopped++
			}
		}
		if stopped == len(tasks) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d: %d of %d threads stopped after %v", pid, stopped, len(tasks), d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
