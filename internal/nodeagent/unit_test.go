package nodeagent

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/zeitwork/zeitwork/internal/rootfs"
)

func TestNormalize(t *testing.T) {
	ok := Spec{ID: "i-1", Image: "registry.example/app@sha256:" + fmt.Sprintf("%064x", 1)}
	got, err := normalize(ok)
	if err != nil || got.Port != 8080 || got.VCPUs != 1 || got.MemoryMiB != 128 {
		t.Fatalf("defaults: %+v %v", got, err)
	}
	for name, mutate := range map[string]func(*Spec){
		"id with a slash":      func(s *Spec) { s.ID = "a/b" },
		"id too long":          func(s *Spec) { s.ID = string(make([]byte, 65)) },
		"no image":             func(s *Spec) { s.Image = "" },
		"bad image":            func(s *Spec) { s.Image = "UPPER/Case::x" },
		"port":                 func(s *Spec) { s.Port = 65536 },
		"vcpus":                func(s *Spec) { s.VCPUs = 33 },
		"memory":               func(s *Spec) { s.MemoryMiB = 64 },
		"relative health path": func(s *Spec) { s.HealthPath = "healthz" },
		"env name with =":      func(s *Spec) { s.Env = map[string]string{"A=B": "c"} },
		"env value with NUL":   func(s *Spec) { s.Env = map[string]string{"A": "b\x00"} },
	} {
		s := ok
		mutate(&s)
		if _, err := normalize(s); !errors.Is(err, errInvalid) {
			t.Errorf("%s: err = %v, want invalid", name, err)
		}
	}
}

func FuzzNormalize(f *testing.F) {
	f.Add([]byte(`{"id":"a","image":"r/x:1","port":80,"env":{"A":"1"},"health_path":"/h"}`))
	f.Add([]byte(`{"id":"../x","image":"","vcpus":-1}`))
	f.Add([]byte(`{"id":"a","image":"r/x","memory_mib":1e9}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var s Spec
		if json.Unmarshal(b, &s) != nil {
			return
		}
		n, err := normalize(s)
		if err != nil {
			if !errors.Is(err, errInvalid) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if !idPattern.MatchString(n.ID) || n.Port < 1 || n.Port > 65535 || n.VCPUs < 1 || n.MemoryMiB < 96 {
			t.Fatalf("accepted %+v", n)
		}
	})
}

func TestRunEnv(t *testing.T) {
	img := rootfs.Config{Env: []string{"PATH=/img/bin", "FOO=image", "EMPTY=", "PORT=1"}, Home: "/home/app"}
	got := runEnv(img, Spec{Port: 8080, Env: map[string]string{"FOO": "project", "BAR": "x"}})
	want := []string{"PATH=/img/bin", "FOO=project", "EMPTY=", "PORT=8080", "BAR=x", "HOME=/home/app"}
	if !slices.Equal(got, want) {
		t.Fatalf("runEnv = %q, want %q", got, want)
	}
	got = runEnv(rootfs.Config{}, Spec{Port: 80, Env: map[string]string{"HOME": "/h"}})
	if !slices.Contains(got, "HOME=/h") || !slices.Contains(got, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") {
		t.Fatalf("defaults: %q", got)
	}
}

// TestLogRing: followers keep their place by sequence number while the
// ring drops old lines, and the log file survives for re-adoption.
func TestLogRing(t *testing.T) {
	in := &instance{dir: t.TempDir(), logWake: make(chan struct{})}
	for i := range logRing + 10 {
		in.appendLog("stdout", fmt.Sprint(i))
	}
	lines, next, _ := in.logsSince(0)
	if len(lines) != logRing || lines[0].Line != "10" || next != logRing+10 {
		t.Fatalf("ring: %d lines from %q, next %d", len(lines), lines[0].Line, next)
	}
	in.appendLog("stderr", "late")
	lines, next2, _ := in.logsSince(next)
	if len(lines) != 1 || lines[0].Line != "late" || lines[0].Stream != "stderr" || next2 != next+1 {
		t.Fatalf("follow: %+v next %d", lines, next2)
	}
	in.closeLogs()
	again := &instance{dir: in.dir, logWake: make(chan struct{})}
	again.loadLogs()
	lines, _, _ = again.logsSince(0)
	if len(lines) != logRing || lines[len(lines)-1].Line != "late" {
		t.Fatalf("reloaded %d lines ending %q", len(lines), lines[len(lines)-1].Line)
	}
}
