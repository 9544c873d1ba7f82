package rootfs

import (
	"archive/tar"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"

	ib "github.com/zeitwork/zeitwork/internal/imagebuild"
)

func TestCleanName(t *testing.T) {
	for in, want := range map[string]string{
		"a/b": "a/b", "/a/b": "a/b", "../../etc/passwd": "etc/passwd", "a/../../b": "b",
		"./": "", "/": "", "a/./b/": "a/b", "..\\..\\x": "x",
	} {
		if got := CleanName(in); got != want {
			t.Errorf("CleanName(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzCleanName(f *testing.F) {
	for _, s := range []string{"a/b", "../x", "/abs", "a/../../../b", ".wh..wh..opq"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c := CleanName(s)
		if strings.HasPrefix(c, "/") || c == ".." || strings.HasPrefix(c, "../") || strings.Contains(c, "/../") {
			t.Fatalf("CleanName(%q) = %q escapes", s, c)
		}
	})
}

func TestLayerSemantics(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	l1, err := ib.Layer(
		ib.Entry{Name: "etc/", Type: tar.TypeDir},
		ib.Entry{Name: "etc/passwd", Data: []byte("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n")},
		ib.Entry{Name: "etc/group", Data: []byte("root:x:0:\napp:x:1001:\n")},
		ib.Entry{Name: "gone.txt", Data: []byte("deleted by the upper layer")},
		ib.Entry{Name: "opaque/", Type: tar.TypeDir},
		ib.Entry{Name: "opaque/old.txt", Data: []byte("hidden by opaque")},
		ib.Entry{Name: "data/original.txt", Data: []byte("shared"), UID: 1000, GID: 1001, Mode: 0o640},
	)
	if err != nil {
		t.Fatal(err)
	}
	l2, err := ib.Layer(
		ib.Entry{Name: ".wh.gone.txt"},
		ib.Entry{Name: "opaque/.wh..wh..opq"},
		ib.Entry{Name: "opaque/new.txt", Data: []byte("kept")},
		ib.Entry{Name: "data/hardlink.txt", Type: tar.TypeLink, Linkname: "data/original.txt"},
		ib.Entry{Name: "escape", Type: tar.TypeSymlink, Linkname: "/etc"},
		ib.Entry{Name: "up", Type: tar.TypeSymlink, Linkname: "../../../../tmp"},
		ib.Entry{Name: "../../outside.txt", Data: []byte("contained")},
		ib.Entry{Name: "bin/tool", Data: []byte("#!"), Mode: 0o4755},
		ib.Entry{Name: "attr.txt", Data: []byte("x"), Xattrs: map[string]string{"user.zeitwork": "yes"}},
	)
	if err != nil {
		t.Fatal(err)
	}
	img, err := ib.Image(ib.Config{Entrypoint: []string{"/bin/tool"}, User: "app", WorkingDir: "/data"}, l1, l2)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := ib.Push(t.Context(), host+"/test/hostile:v1", img)
	if err != nil {
		t.Fatal(err)
	}
	store, err := NewStore(t.TempDir(), 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Concurrent requests convert once.
	var wg sync.WaitGroup
	results := make([]*Image, 4)
	errs := make([]error, 4)
	for i := range 4 {
		wg.Go(func() {
			im, release, err := store.Get(t.Context(), ref)
			results[i], errs[i] = im, err
			if err == nil {
				release()
			}
		})
	}
	wg.Wait()
	for i := range 4 {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if results[i].Path != results[0].Path {
			t.Fatal("concurrent gets produced different images")
		}
	}
	im := results[0]
	if im.Config.UID != 1000 || im.Config.GID != 1001 || im.Config.WorkDir != "/data" {
		t.Fatalf("config = %+v", im.Config)
	}
	// Inspect the tree the same way the ext4 was built from.
	tree := t.TempDir()
	if _, err := Flatten(t.Context(), img, tree); err != nil {
		t.Fatal(err)
	}
	check := func(p string, wantExist bool) {
		t.Helper()
		_, err := os.Lstat(filepath.Join(tree, p))
		if (err == nil) != wantExist {
			t.Errorf("%s exists=%v, want %v", p, err == nil, wantExist)
		}
	}
	check("gone.txt", false)
	check("opaque/old.txt", false)
	check("opaque/new.txt", true)
	check("outside.txt", true)
	if target, _ := os.Readlink(filepath.Join(tree, "up")); target != "../../../../tmp" {
		t.Errorf("symlink target rewritten to %q", target)
	}
	a, _ := os.Stat(filepath.Join(tree, "data/original.txt"))
	b, _ := os.Stat(filepath.Join(tree, "data/hardlink.txt"))
	if !os.SameFile(a, b) {
		t.Error("hard link is a copy")
	}
	st := a.Sys().(*syscall.Stat_t)
	if st.Uid != 1000 || st.Gid != 1001 || a.Mode().Perm() != 0o640 {
		t.Errorf("owner %d:%d mode %v", st.Uid, st.Gid, a.Mode())
	}
	if fi, _ := os.Stat(filepath.Join(tree, "bin/tool")); fi.Mode()&os.ModeSetuid == 0 {
		t.Error("setuid bit lost")
	}
	buf := make([]byte, 8)
	if n, err := syscall.Getxattr(filepath.Join(tree, "attr.txt"), "user.zeitwork", buf); err != nil || string(buf[:n]) != "yes" {
		t.Errorf("xattr: %q %v", buf[:n], err)
	}
}

// TestWriteThroughSymlinkRejected: a layer that writes through a symlink
// pointing outside the image is rejected with a clear error, and nothing
// lands outside.
func TestWriteThroughSymlinkRejected(t *testing.T) {
	outside := t.TempDir()
	l, err := ib.Layer(
		ib.Entry{Name: "escape", Type: tar.TypeSymlink, Linkname: outside},
		ib.Entry{Name: "escape/pwned", Data: []byte("x")},
	)
	if err != nil {
		t.Fatal(err)
	}
	img, err := ib.Image(ib.Config{Cmd: []string{"/x"}}, l)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Flatten(t.Context(), img, t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "escape") {
		t.Fatalf("Flatten = %v, want an escape error", err)
	}
	if _, err := os.Stat(filepath.Join(outside, "pwned")); err == nil {
		t.Fatal("a layer wrote through a symlink outside the image")
	}
}
