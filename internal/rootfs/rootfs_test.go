package rootfs

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/zeitwork/zeitwork/internal/ocitest"
)

func TestCleanName(t *testing.T) {
	for in, want := range map[string]string{
		"a/b": "a/b", "/a/b": "a/b", "../../etc/passwd": "etc/passwd", "a/../../b": "b",
		"./": "", "/": "", "a/./b/": "a/b", "..\\..\\x": "x", "": "", "./a//b": "a/b",
	} {
		if got := CleanName(in); got != want {
			t.Errorf("CleanName(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzCleanName(f *testing.F) {
	for _, s := range []string{"a/b", "../x", "/abs", "a/../../../b", ".wh..wh..opq", "..", "\\..\\"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c := CleanName(s)
		if strings.HasPrefix(c, "/") || c == ".." || strings.HasPrefix(c, "../") || strings.Contains(c, "/../") || strings.HasSuffix(c, "/..") {
			t.Fatalf("CleanName(%q) = %q escapes", s, c)
		}
		if CleanName(c) != c {
			t.Fatalf("CleanName is not idempotent on %q", s)
		}
	})
}

// apply flattens layers (each a list of entries) into a fresh tree inside
// a parent directory and returns both.
func apply(t *testing.T, layers ...[]ocitest.Entry) (tree, parent string, err error) {
	t.Helper()
	parent = t.TempDir()
	tree = filepath.Join(parent, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		b, terr := ocitest.Tar(l...)
		if terr != nil {
			t.Fatal(terr)
		}
		if _, err = FlattenTar(t.Context(), bytes.NewReader(b), tree); err != nil {
			return tree, parent, err
		}
	}
	return tree, parent, nil
}

type E = ocitest.Entry

// TestLayerRules checks each layer rule on its own.
func TestLayerRules(t *testing.T) {
	exists := func(p string) func(t *testing.T, tree string) {
		return func(t *testing.T, tree string) {
			if _, err := os.Lstat(filepath.Join(tree, p)); err != nil {
				t.Errorf("%s missing: %v", p, err)
			}
		}
	}
	absent := func(p string) func(t *testing.T, tree string) {
		return func(t *testing.T, tree string) {
			if _, err := os.Lstat(filepath.Join(tree, p)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s exists (err %v)", p, err)
			}
		}
	}
	content := func(p, want string) func(t *testing.T, tree string) {
		return func(t *testing.T, tree string) {
			if b, err := os.ReadFile(filepath.Join(tree, p)); err != nil || string(b) != want {
				t.Errorf("%s = %q (%v), want %q", p, b, err, want)
			}
		}
	}
	for _, tc := range []struct {
		name    string
		layers  [][]E
		wantErr string
		checks  []func(*testing.T, string)
	}{
		{name: "whiteout file", layers: [][]E{{ocitest.File("a/x", "1"), ocitest.File("a/y", "1")}, {ocitest.Whiteout("a", "x")}},
			checks: []func(*testing.T, string){absent("a/x"), exists("a/y")}},
		{name: "whiteout directory", layers: [][]E{{ocitest.File("a/b/c", "1")}, {ocitest.Whiteout("a", "b")}},
			checks: []func(*testing.T, string){absent("a/b"), exists("a")}},
		{name: "whiteout does not hide its own layer", layers: [][]E{{ocitest.File("x", "old")}, {ocitest.File("x", "new"), ocitest.Whiteout("", "x")}},
			checks: []func(*testing.T, string){content("x", "new")}},
		{name: "whiteout of a missing path", layers: [][]E{{ocitest.Whiteout("nowhere", "x")}},
			checks: []func(*testing.T, string){absent("nowhere/x")}},
		{name: "opaque keeps entries of its own layer", layers: [][]E{
			{ocitest.File("o/old", "1"), ocitest.File("o/d/old", "1")},
			{ocitest.File("o/d/new", "2"), ocitest.Opaque("o"), ocitest.File("o/later", "3")}},
			checks: []func(*testing.T, string){absent("o/old"), absent("o/d/old"), content("o/d/new", "2"), content("o/later", "3")}},
		{name: "opaque root directory", layers: [][]E{{ocitest.File("x", "1")}, {ocitest.Opaque(""), ocitest.File("y", "2")}},
			checks: []func(*testing.T, string){absent("x"), exists("y")}},
		{name: "hard link across layers", layers: [][]E{{ocitest.File("a", "data")}, {ocitest.Link("b", "a")}},
			checks: []func(*testing.T, string){func(t *testing.T, tree string) {
				a, _ := os.Stat(filepath.Join(tree, "a"))
				b, _ := os.Stat(filepath.Join(tree, "b"))
				if a == nil || b == nil || !os.SameFile(a, b) {
					t.Error("b is not a hard link of a")
				}
			}}},
		{name: "hard link with ../ target is contained", layers: [][]E{{ocitest.File("a", "data"), ocitest.Link("b", "../../a")}},
			checks: []func(*testing.T, string){content("b", "data")}},
		{name: "hard link to a missing file", layers: [][]E{{ocitest.Link("b", "missing")}}, wantErr: "hard link"},
		{name: "hard link to a symlink leaving the root links the symlink", layers: [][]E{{ocitest.Symlink("s", "/etc/passwd"), ocitest.Link("h", "s")}},
			checks: []func(*testing.T, string){func(t *testing.T, tree string) {
				if l, err := os.Readlink(filepath.Join(tree, "h")); err != nil || l != "/etc/passwd" {
					t.Errorf("h = %q %v", l, err)
				}
			}}},
		{name: "symlink targets are stored verbatim", layers: [][]E{{ocitest.Symlink("abs", "/etc/shadow"), ocitest.Symlink("rel", "../../../x")}},
			checks: []func(*testing.T, string){func(t *testing.T, tree string) {
				for p, want := range map[string]string{"abs": "/etc/shadow", "rel": "../../../x"} {
					if l, _ := os.Readlink(filepath.Join(tree, p)); l != want {
						t.Errorf("%s -> %q, want %q", p, l, want)
					}
				}
			}}},
		{name: "write through an absolute symlink stays inside", layers: [][]E{{ocitest.Dir("real/"), ocitest.Symlink("s", "/real")}, {ocitest.File("s/f", "x")}},
			checks: []func(*testing.T, string){content("real/f", "x")}},
		{name: "write through a ../ symlink stays inside", layers: [][]E{{ocitest.Symlink("up", "../../../../tmp")}, {ocitest.File("up/f", "x")}},
			checks: []func(*testing.T, string){content("tmp/f", "x")}},
		{name: "symlink loop", layers: [][]E{{ocitest.Symlink("a", "b"), ocitest.Symlink("b", "a"), ocitest.File("a/x", "1")}}, wantErr: "too many levels"},
		{name: "file under a file", layers: [][]E{{ocitest.File("f", "1"), ocitest.File("f/x", "1")}}, wantErr: "not a directory"},
		{name: "file replaces directory", layers: [][]E{{ocitest.File("d/x", "1")}, {ocitest.File("d", "file")}},
			checks: []func(*testing.T, string){content("d", "file")}},
		{name: "directory replaces file and symlink", layers: [][]E{{ocitest.File("d", "1"), ocitest.Symlink("s", "/etc")}, {ocitest.Dir("d/"), ocitest.Dir("s/")}},
			checks: []func(*testing.T, string){func(t *testing.T, tree string) {
				for _, p := range []string{"d", "s"} {
					if fi, err := os.Lstat(filepath.Join(tree, p)); err != nil || !fi.IsDir() {
						t.Errorf("%s is not a directory", p)
					}
				}
			}}},
		{name: "directory entries merge and update owner and mode", layers: [][]E{
			{ocitest.File("d/x", "1")}, {E{Name: "d/", Type: tar.TypeDir, Mode: 0o750, UID: 7, GID: 8}}},
			checks: []func(*testing.T, string){exists("d/x"), func(t *testing.T, tree string) {
				fi, _ := os.Stat(filepath.Join(tree, "d"))
				st := fi.Sys().(*syscall.Stat_t)
				if fi.Mode().Perm() != 0o750 || st.Uid != 7 || st.Gid != 8 {
					t.Errorf("d: %v %d:%d", fi.Mode(), st.Uid, st.Gid)
				}
			}}},
		{name: "../ and absolute names are contained", layers: [][]E{{ocitest.File("../../../x", "1"), ocitest.File("/y", "2"), ocitest.File("a/../../z", "3")}},
			checks: []func(*testing.T, string){content("x", "1"), content("y", "2"), content("z", "3")}},
		{name: "setuid survives chown", layers: [][]E{{E{Name: "s", Data: []byte("x"), Mode: 0o4755, UID: 5, GID: 5}}},
			checks: []func(*testing.T, string){func(t *testing.T, tree string) {
				fi, _ := os.Stat(filepath.Join(tree, "s"))
				if fi.Mode()&fs.ModeSetuid == 0 || fi.Mode().Perm() != 0o755 {
					t.Errorf("s: %v", fi.Mode())
				}
			}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tree, parent, err := apply(t, tc.layers...)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			for _, c := range tc.checks {
				c(t, tree)
			}
			assertContained(t, parent)
		})
	}
}

// assertContained fails when anything but the tree exists in parent.
func assertContained(t *testing.T, parent string) {
	t.Helper()
	entries, _ := os.ReadDir(parent)
	for _, e := range entries {
		if e.Name() != "tree" {
			t.Fatalf("a layer wrote %s outside the image", e.Name())
		}
	}
}

// FuzzFlattenTar feeds layers of arbitrary names, link targets and types
// and checks that nothing is ever written outside the image directory.
func FuzzFlattenTar(f *testing.F) {
	f.Add("../x", "", byte('0'), "up", "../..", byte('2'), "up/pwn")
	f.Add("s", "/", byte('2'), "s/etc/x", "", byte('0'), "s/../../y")
	f.Add("a", "..", byte('2'), "a/b", "a", byte('1'), "a/b/c")
	f.Add("d/", "", byte('5'), ".wh.d", "", byte('0'), "d/.wh..wh..opq")
	f.Add("l", "../../../../", byte('2'), "l/l2", "../..", byte('2'), "l/l2/z")
	f.Fuzz(func(t *testing.T, n1, l1 string, t1 byte, n2, l2 string, t2 byte, n3 string) {
		types := []byte{tar.TypeReg, tar.TypeDir, tar.TypeSymlink, tar.TypeLink, tar.TypeFifo}
		pick := func(b byte) byte { return types[int(b)%len(types)] }
		var layers [][]byte
		for _, l := range [][]E{{
			{Name: n1, Type: pick(t1), Linkname: l1, Data: []byte("1")},
			{Name: n2, Type: pick(t2), Linkname: l2, Data: []byte("2")},
		}, {{Name: n3, Data: []byte("3")}, {Name: n3 + "/x", Data: []byte("4")}}} {
			b, err := ocitest.Tar(l...)
			if err != nil {
				return // not encodable as tar
			}
			layers = append(layers, b)
		}
		parent := t.TempDir()
		tree := filepath.Join(parent, "tree")
		if err := os.Mkdir(tree, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, b := range layers {
			if _, err := FlattenTar(t.Context(), bytes.NewReader(b), tree); err != nil {
				break
			}
		}
		assertContained(t, parent)
	})
}

// TestHostileImage flattens the runtime tests' image and compares every
// path with the expectations the booted VM is checked against.
func TestHostileImage(t *testing.T) {
	img := ocitest.AppImage(t, []byte("#!binary"))
	parent := t.TempDir()
	tree := filepath.Join(parent, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		t.Fatal(err)
	}
	st, err := Flatten(t.Context(), img, tree, 0)
	if err != nil {
		t.Fatal(err)
	}
	if st.Removed != 3 || st.Skipped != 0 {
		t.Errorf("stats = %+v", st)
	}
	files := map[string]map[string]any{}
	for _, p := range ocitest.Paths() {
		files[p] = ocitest.Describe(filepath.Join(tree, p))
	}
	ocitest.Check(t, files)
	assertContained(t, parent)
	if _, err := Flatten(t.Context(), img, t.TempDir(), 100); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("size limit: %v", err)
	}
}

func TestResolveUser(t *testing.T) {
	passwd := "root:x:0:0:root:/root:/bin/sh\n# comment\napp:x:1000:1001:App:/home/app:/bin/sh\nbad:x:x:1::/:/bin/sh\nnohome:x:7:7:::/bin/sh\n"
	group := "root:x:0:\napp:x:1001:\nextra:x:2000:other,app\nmore:x:2001:app\nwheel:x:10:root\n"
	for _, tc := range []struct {
		user    string
		want    User
		wantErr bool
	}{
		{user: "", want: User{UID: 0, GID: 0, Groups: []uint32{10}, Home: "/root"}},
		{user: "root", want: User{UID: 0, GID: 0, Groups: []uint32{10}, Home: "/root"}},
		{user: "app", want: User{UID: 1000, GID: 1001, Groups: []uint32{2000, 2001}, Home: "/home/app"}},
		{user: "1000", want: User{UID: 1000, GID: 1001, Groups: []uint32{2000, 2001}, Home: "/home/app"}},
		{user: "4242", want: User{UID: 4242, GID: 0, Home: "/"}},
		{user: "4242:99", want: User{UID: 4242, GID: 99, Home: "/"}},
		{user: "app:extra", want: User{UID: 1000, GID: 2000, Home: "/home/app"}},
		{user: "app:0", want: User{UID: 1000, GID: 0, Home: "/home/app"}},
		{user: "nohome", want: User{UID: 7, GID: 7, Home: "/"}},
		{user: "ghost", wantErr: true},
		{user: "app:ghosts", wantErr: true},
		{user: "bad", wantErr: true},
		{user: ":1", wantErr: true},
	} {
		got, err := resolveUser(tc.user, passwd, group)
		if (err != nil) != tc.wantErr {
			t.Errorf("%q: err = %v", tc.user, err)
			continue
		}
		if err == nil && (got.UID != tc.want.UID || got.GID != tc.want.GID || got.Home != tc.want.Home || !slices.Equal(got.Groups, tc.want.Groups)) {
			t.Errorf("%q = %+v, want %+v", tc.user, got, tc.want)
		}
	}
}

func FuzzResolveUser(f *testing.F) {
	f.Add("app:extra", "app:x:1:2:a:/h:/bin/sh\n", "extra:x:3:app\n")
	f.Add("1:2", "", "")
	f.Add("a::", "a:::::::\n", "::::\n")
	f.Fuzz(func(t *testing.T, user, passwd, group string) {
		u, err := resolveUser(user, passwd, group)
		if err == nil && u.Home == "" {
			t.Fatal("empty home")
		}
	})
}

// TestStore pulls from a loopback registry: a multi-platform index, one
// conversion for concurrent requests, a valid ext4, offline hits by
// digest, and LRU eviction that spares images in use.
func TestStore(t *testing.T) {
	srv := ocitest.NewRegistry(t)
	host := ocitest.Host(srv)
	ctx := t.Context()
	app := ocitest.AppImage(t, []byte("#!binary"))
	arm := ocitest.Image(t, ocitest.Config{Cmd: []string{"/wrong-arch"}, Arch: "arm64"}, ocitest.Layer(t, ocitest.File("arm", "1")))
	idxRef := ocitest.PushIndex(ctx, t, host+"/multi:v1", arm, app)
	if !strings.Contains(idxRef, "@sha256:") {
		t.Fatal(idxRef)
	}

	store, err := New(Settings{Dir: t.TempDir(), Headroom: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	var wg sync.WaitGroup
	results := make([]*Image, 4)
	errs := make([]error, 4)
	for i := range 4 {
		wg.Go(func() {
			im, release, err := store.Get(ctx, host+"/multi:v1")
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
	if u := store.Usage(); u.Images != 1 || u.InUse != 0 {
		t.Fatalf("usage = %+v, want one image not in use", u)
	}
	im := results[0]
	appDigest, _ := app.Digest()
	if im.Digest != appDigest.String() {
		t.Fatalf("index resolved to %s, want the amd64 image %s", im.Digest, appDigest)
	}
	c := im.Config
	if c.UID != 1000 || c.GID != 1000 || !slices.Equal(c.Groups, []uint32{2000}) || c.WorkDir != "/data" || c.Home != "/home/app" ||
		!slices.Equal(c.Ports, []int{8080}) || !slices.Contains(c.Env, ocitest.AppEnv) {
		t.Fatalf("config = %+v", c)
	}
	if out, err := exec.Command("e2fsck", "-fn", im.Path).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	if out, err := exec.Command("debugfs", "-R", "cat /opaque/new.txt", im.Path).Output(); err != nil || string(out) != "kept" {
		t.Fatalf("debugfs cat = %q %v", out, err)
	}

	// The pinned reference is served from the cache with the registry gone.
	srv.Close()
	again, release, err := store.Get(ctx, im.Ref)
	if err != nil {
		t.Fatalf("offline get by digest: %v", err)
	}
	if again.Path != im.Path {
		t.Fatal("offline get converted again")
	}
	release()
	if _, _, err := store.Get(ctx, host+"/multi:v1"); err == nil {
		t.Fatal("a tag resolved without the registry")
	}

	// Eviction: bound the cache to about one image.
	host2 := ocitest.Registry(t)
	push2 := func(name string) string {
		img := ocitest.Image(t, ocitest.Config{Cmd: []string{"/" + name}}, ocitest.Layer(t, ocitest.File(name, name)))
		return ocitest.Push(ctx, t, host2+"/"+name+":v1", img)
	}
	b2, c2, d2 := push2("b"), push2("c"), push2("d")
	lru, err := New(Settings{Dir: t.TempDir(), Headroom: 1 << 20, MaxBytes: 1})
	if err != nil {
		t.Fatal(err)
	}
	imB, relB, err := lru.Get(ctx, b2)
	if err != nil {
		t.Fatal(err)
	}
	imC, relC, err := lru.Get(ctx, c2)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{imB.Path, imC.Path} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("an image in use was evicted: %v", err)
		}
	}
	relB()
	relC()
	imD, relD, err := lru.Get(ctx, d2)
	if err != nil {
		t.Fatal(err)
	}
	defer relD()
	for _, p := range []string{imB.Path, imC.Path} {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("%s not evicted", p)
		}
	}
	if _, err := os.Stat(imD.Path); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkConvert compares flattening plus mkfs.ext4 with the floor a
// shell pipeline sets on the same layers: `tar -x` of each layer in order
// plus `mkfs.ext4 -d` (which honours no whiteouts and no containment).
// Reports MB/s and the ratio (ours / tar+mkfs; 1 = as fast).
func BenchmarkConvert(b *testing.B) {
	const layers, files, size = 4, 64, 1 << 20 // 256 MiB of file content
	var ls []v1.Layer
	var tars [][]byte
	for l := range layers {
		var entries []E
		for i := range files {
			data := make([]byte, size)
			_, _ = rand.Read(data)
			entries = append(entries, E{Name: fmt.Sprintf("layer%d/dir%d/file%d", l, i%8, i), Data: data})
		}
		tb, err := ocitest.Tar(entries...)
		if err != nil {
			b.Fatal(err)
		}
		tars = append(tars, tb)
		ls = append(ls, ocitest.Layer(b, entries...))
	}
	img := ocitest.Image(b, ocitest.Config{Cmd: []string{"/x"}}, ls...)
	total := float64(layers * files * size)
	var ours, floor time.Duration
	for b.Loop() {
		dir := b.TempDir()
		start := time.Now()
		tree := filepath.Join(dir, "tree")
		_ = os.Mkdir(tree, 0o755)
		if _, err := Flatten(b.Context(), img, tree, 0); err != nil {
			b.Fatal(err)
		}
		if err := MakeExt4(b.Context(), tree, filepath.Join(dir, "a.ext4"), 64<<20); err != nil {
			b.Fatal(err)
		}
		ours += time.Since(start)

		start = time.Now()
		tree2 := filepath.Join(dir, "tree2")
		_ = os.Mkdir(tree2, 0o755)
		for _, tb := range tars {
			cmd := exec.Command("tar", "-x", "-C", tree2)
			cmd.Stdin = bytes.NewReader(tb)
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatalf("tar: %v %s", err, out)
			}
		}
		used, _, _ := usage(tree2)
		if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree2, "-O", "^has_journal", filepath.Join(dir, "b.ext4"),
			fmt.Sprintf("%dk", (used+used/10+64<<20+4<<20)/1024)).CombinedOutput(); err != nil {
			b.Fatalf("mkfs: %v %s", err, out)
		}
		floor += time.Since(start)
	}
	b.ReportMetric(total/1e6/(ours.Seconds()/float64(b.N)), "MB/s")
	b.ReportMetric(total/1e6/(floor.Seconds()/float64(b.N)), "floor_MB/s")
	b.ReportMetric(ours.Seconds()/floor.Seconds(), "ratio_vs_tar_mkfs")
}
