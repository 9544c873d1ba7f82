package cli

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func listArchive(t *testing.T, b []byte) []string {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var out []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		e := h.Name
		switch h.Typeflag {
		case tar.TypeSymlink:
			e += " -> " + h.Linkname
		case tar.TypeReg:
			data, _ := io.ReadAll(tr)
			e += " = " + string(data)
		}
		if h.Uid != 0 || h.Gid != 0 || h.Uname != "" {
			t.Fatalf("%s owned by %d:%d %s", h.Name, h.Uid, h.Gid, h.Uname)
		}
		out = append(out, e)
	}
}

func TestArchiveDir(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("Dockerfile", "FROM scratch\n")
	write("src/b.go", "b")
	write("src/a.go", "a")
	write(".git/HEAD", "ref: refs/heads/main\n")
	write("vendor/mod/.git", "gitdir: ../../.git/modules/mod\n")
	write(".dockerignore", "tmp\n")
	if err := os.Symlink("../../etc/passwd", filepath.Join(dir, "src/link")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	var one, two bytes.Buffer
	if err := ArchiveDir(dir, &one, MaxSourceBytes); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(listArchive(t, one.Bytes()), "\n")
	want := strings.Join([]string{".dockerignore = tmp\n", "Dockerfile = FROM scratch\n", "src/", "src/a.go = a", "src/b.go = b",
		"src/link -> ../../etc/passwd", "vendor/", "vendor/mod/"}, "\n")
	if got != want {
		t.Fatalf("archive:\n%s\nwant:\n%s", got, want)
	}
	if err := ArchiveDir(dir, &two, MaxSourceBytes); err != nil || !bytes.Equal(one.Bytes(), two.Bytes()) {
		t.Fatalf("archiving twice gave other bytes (%v)", err)
	}
	write("big", strings.Repeat("random-ish data ", 1<<16))
	if err := ArchiveDir(dir, io.Discard, 1024); !errors.Is(err, errSourceTooLarge) {
		t.Fatalf("over the limit: %v", err)
	}
}

// TestDeploySource drives `deploy --source` and `builds` against a fake
// operator: upload, deploy with the source id, the build log, the phases.
func TestDeploySource(t *testing.T) {
	var uploaded []byte
	polls := 0
	op := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == "POST" && r.URL.Path == "/api/v1/projects/web/sources":
			if r.Header.Get("Content-Type") != "application/gzip" {
				w.WriteHeader(400)
				return
			}
			uploaded, _ = io.ReadAll(r.Body)
			w.WriteHeader(201)
			_ = json.NewEncoder(w).Encode(map[string]any{"source_id": "src-1", "sha256": "ab", "size": len(uploaded)})
		case r.Method == "POST" && r.URL.Path == "/api/v1/projects/web/deployments":
			var req map[string]any
			_ = json.NewDecoder(r.Body).Decode(&req)
			if req["source_id"] != "src-1" || req["image"] != nil {
				w.WriteHeader(400)
				_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"code": "invalid_request", "message": "bad request"}})
				return
			}
			w.WriteHeader(202)
			_ = json.NewEncoder(w).Encode(map[string]any{"id": "dep-1", "status": "pending", "image": "reg/acme/web:src-ab", "build": map[string]any{"id": "b-1", "state": "queued"}})
		case r.URL.Path == "/api/v1/builds/b-1/logs":
			if r.URL.Query().Get("follow") != "1" {
				w.WriteHeader(400)
				return
			}
			for i, l := range []string{"fetching source", "STEP 1/1: FROM scratch"} {
				stream := "build"
				if i == 0 {
					stream = "zeitwork"
				}
				_ = json.NewEncoder(w).Encode(map[string]any{"seq": i + 1, "time": time.Now(), "stream": stream, "line": l})
			}
		case r.URL.Path == "/api/v1/deployments/dep-1":
			polls++
			status := "building"
			if polls > 1 {
				status = "active"
			}
			_ = json.NewEncoder(w).Encode(map[string]any{"id": "dep-1", "status": status, "url": "https://web-x-acme.zeitwork.test",
				"production_url": "https://web-acme.zeitwork.test", "active": status == "active", "build": map[string]any{"id": "b-1", "state": "succeeded"}})
		case r.URL.Path == "/api/v1/projects/web/builds":
			_ = json.NewEncoder(w).Encode(map[string]any{"builds": []map[string]any{{"id": "b-1", "state": "failed", "source_kind": "git",
				"commit_sha": strings.Repeat("a", 40), "branch": "main", "error": "RUN make: exit 2\nlast lines", "created_at": time.Now()}}})
		default:
			w.WriteHeader(404)
		}
	}))
	defer op.Close()
	t.Setenv("ZEITWORK_CONFIG", filepath.Join(t.TempDir(), "config.json"))
	t.Setenv("ZEITWORK_API_URL", op.URL)
	t.Setenv("ZEITWORK_TOKEN", "good")
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "Dockerfile"), []byte("FROM scratch\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	if code := Main([]string{"deploy", "-p", "web", "--source", src}, strings.NewReader(""), &out, &errb); code != 0 {
		t.Fatalf("deploy --source: %d %s", code, errb.String())
	}
	if got := listArchive(t, uploaded); len(got) != 1 || got[0] != "Dockerfile = FROM scratch\n" {
		t.Fatalf("uploaded %v", got)
	}
	if !strings.Contains(errb.String(), "==> fetching source\nSTEP 1/1: FROM scratch\n") || !strings.Contains(errb.String(), "(build b-1)") {
		t.Fatalf("progress: %s", errb.String())
	}
	if !strings.Contains(out.String(), "https://web-acme.zeitwork.test") {
		t.Fatalf("output: %s", out.String())
	}
	out.Reset()
	if code := Main([]string{"builds", "ls", "-p", "web"}, strings.NewReader(""), &out, &errb); code != 0 || !strings.Contains(out.String(), "aaaaaaaaaaaa") ||
		!strings.Contains(out.String(), "RUN make: exit 2") || strings.Contains(out.String(), "last lines") {
		t.Fatalf("builds ls: %d %s", code, out.String())
	}
	if code := Main([]string{"deploy", "-p", "web", "--source", src, "--image", "x"}, strings.NewReader(""), &out, &errb); code != ExitUsage {
		t.Fatalf("--source with --image: %d", code)
	}
}
