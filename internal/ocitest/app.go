package ocitest

import (
	"archive/tar"
	"context"
	"fmt"
	"os"
	"syscall"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// TestAppPackage is the import path of the test app (see testapp).
const TestAppPackage = "github.com/zeitwork/zeitwork/internal/ocitest/testapp"

// App identity the test image declares.
const (
	AppUID      = 1000
	AppGID      = 1000
	AppExtraGID = 2000 // supplementary group listing "app" in /etc/group
	AppWorkDir  = "/data"
	AppHome     = "/home/app"
	AppEnv      = "FOO=from-image"
	AppPort     = 8080
)

// HostileLayers returns the test image's two layers around binary (the
// app, stored as /app/testapp): the lower one lays out files, the upper
// one exercises every layer rule — whiteouts of a file and of a directory,
// an opaque directory, a hard link across layers, symlinks pointing
// outside the root (relative and absolute), an entry written through an
// absolute symlink, "../" and absolute entry names, a directory replaced
// by a file, a directory whose owner and mode change, setuid, device
// nodes, a FIFO and an xattr. Expectations lists the result.
func HostileLayers(t testing.TB, binary []byte) []v1.Layer {
	t.Helper()
	lower := Layer(t,
		Dir("app/"),
		Entry{Name: "app/testapp", Data: binary, Mode: 0o755},
		Dir("etc/"),
		File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"),
		File("etc/group", "root:x:0:\napp:x:1000:\nextra:x:2000:app\n"),
		Entry{Name: "home/app/", Type: tar.TypeDir, Mode: 0o700, UID: AppUID, GID: AppGID},
		File("gone.txt", "lower"),
		File("gonedir/sub/file.txt", "lower"),
		File("opaque/old.txt", "lower"),
		File("opaque/sub/old2.txt", "lower"),
		Dir("data/"),
		Entry{Name: "data/original.txt", Data: []byte("shared"), UID: AppUID, GID: AppGID, Mode: 0o640},
		Dir("lib/real/"),
		Symlink("libdir", "/lib/real"),
		File("swap/inner.txt", "lower"),
		Entry{Name: "bin/tool", Data: []byte("#!/bin/true\n"), Mode: 0o4755},
		Entry{Name: "nodes/null", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3},
		Entry{Name: "nodes/fifo", Type: tar.TypeFifo, Mode: 0o600},
		Entry{Name: "attr.txt", Data: []byte("x"), Xattrs: map[string]string{"user.zeitwork": "yes"}},
	)
	upper := Layer(t,
		Whiteout("", "gone.txt"),
		Whiteout("", "gonedir"),
		Dir("opaque/"),
		Opaque("opaque"),
		File("opaque/new.txt", "kept"),
		Entry{Name: "data/", Type: tar.TypeDir, Mode: 0o750, UID: AppUID, GID: AppGID},
		Link("data/hardlink.txt", "data/original.txt"),
		Symlink("data/outside", "../../../../etc/passwd"),
		Symlink("hostetc", "/etc"),
		File("../../escaped.txt", "contained"),
		File("/abs.txt", "absolute"),
		File("libdir/through.txt", "through"),
		File("swap", "now a file"),
		File("./dotted/./x/../y.txt", "normalized"),
	)
	return []v1.Layer{lower, upper}
}

// AppImage is the test app on HostileLayers with a non-root USER, ENV,
// WORKDIR and EXPOSE; extraEnv is appended to the image env.
func AppImage(t testing.TB, binary []byte, extraEnv ...string) v1.Image {
	t.Helper()
	return Image(t, Config{
		Entrypoint: []string{"/app/testapp"},
		Env:        append([]string{AppEnv, "PATH=/usr/bin:/bin"}, extraEnv...),
		WorkingDir: AppWorkDir, User: "app", Ports: []int{AppPort},
	}, HostileLayers(t, binary)...)
}

// PushApp builds the test app and pushes AppImage to registry as repo:tag,
// returning the reference by digest.
func PushApp(ctx context.Context, t testing.TB, registry, repo string, binary []byte, extraEnv ...string) string {
	t.Helper()
	return Push(ctx, t, fmt.Sprintf("%s/%s", registry, repo), AppImage(t, binary, extraEnv...))
}

// Expect is what one path must look like in the flattened image; zero
// fields are not checked.
type Expect struct {
	Path    string
	Absent  bool
	Mode    string // fs.FileMode.String()
	Owner   string // "uid:gid"
	Content string
	Link    string // symlink target
	SameAs  string // a path sharing the inode (hard link)
	Xattr   string
	Rdev    string // "major:minor"
}

// Expectations is the result of HostileLayers.
var Expectations = []Expect{
	{Path: "/gone.txt", Absent: true},
	{Path: "/gonedir", Absent: true},
	{Path: "/opaque/old.txt", Absent: true},
	{Path: "/opaque/sub", Absent: true},
	{Path: "/opaque/new.txt", Content: "kept"},
	{Path: "/data", Mode: "drwxr-x---", Owner: "1000:1000"},
	{Path: "/data/original.txt", Mode: "-rw-r-----", Owner: "1000:1000", Content: "shared"},
	{Path: "/data/hardlink.txt", SameAs: "/data/original.txt", Content: "shared"},
	{Path: "/data/outside", Link: "../../../../etc/passwd"},
	{Path: "/hostetc", Link: "/etc"},
	{Path: "/libdir", Link: "/lib/real"},
	{Path: "/lib/real/through.txt", Content: "through"},
	{Path: "/escaped.txt", Content: "contained"},
	{Path: "/abs.txt", Content: "absolute"},
	{Path: "/swap", Mode: "-rw-r--r--", Content: "now a file"},
	{Path: "/dotted/y.txt", Content: "normalized"},
	{Path: "/bin/tool", Mode: "urwxr-xr-x", Owner: "0:0"},
	{Path: "/nodes/null", Mode: "Dcrw-rw-rw-", Rdev: "1:3"},
	{Path: "/nodes/fifo", Mode: "prw-------"},
	{Path: "/attr.txt", Xattr: "yes"},
	{Path: "/home/app", Mode: "drwx------", Owner: "1000:1000"},
}

// Paths lists the paths of Expectations (and their SameAs partners).
func Paths() []string {
	var out []string
	for _, e := range Expectations {
		out = append(out, e.Path)
	}
	return out
}

// Describe reports a file the way the test app does inside the VM: exists,
// mode, uid, gid, ino, nlink, link, rdev, content (small regular files),
// xattr (user.zeitwork).
func Describe(p string) map[string]any {
	fi, err := os.Lstat(p)
	if err != nil {
		return map[string]any{"exists": false}
	}
	st := fi.Sys().(*syscall.Stat_t)
	out := map[string]any{"exists": true, "mode": fi.Mode().String(), "uid": float64(st.Uid), "gid": float64(st.Gid),
		"ino": float64(st.Ino), "nlink": float64(st.Nlink)}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		out["link"], _ = os.Readlink(p)
	case fi.Mode()&os.ModeDevice != 0:
		out["rdev"] = fmt.Sprintf("%d:%d", st.Rdev>>8&0xfff, st.Rdev&0xff)
	case fi.Mode().IsRegular() && fi.Size() < 4096:
		b, _ := os.ReadFile(p)
		out["content"] = string(b)
	}
	buf := make([]byte, 256)
	if n, err := syscall.Getxattr(p, "user.zeitwork", buf); err == nil {
		out["xattr"] = string(buf[:n])
	}
	return out
}

// Check compares described files (path → Describe output, e.g. decoded
// from the test app's /report) with Expectations.
func Check(t testing.TB, files map[string]map[string]any) {
	t.Helper()
	for _, e := range Expectations {
		got, ok := files[e.Path]
		if !ok {
			t.Errorf("%s: not described", e.Path)
			continue
		}
		if exists, _ := got["exists"].(bool); exists == e.Absent {
			t.Errorf("%s: exists=%v, want %v", e.Path, exists, !e.Absent)
			continue
		}
		str := func(k string) string { s, _ := got[k].(string); return s }
		if e.Mode != "" && str("mode") != e.Mode {
			t.Errorf("%s: mode %s, want %s", e.Path, str("mode"), e.Mode)
		}
		if e.Owner != "" {
			if o := fmt.Sprintf("%v:%v", got["uid"], got["gid"]); o != e.Owner {
				t.Errorf("%s: owner %s, want %s", e.Path, o, e.Owner)
			}
		}
		if e.Content != "" && str("content") != e.Content {
			t.Errorf("%s: content %q, want %q", e.Path, str("content"), e.Content)
		}
		if e.Link != "" && str("link") != e.Link {
			t.Errorf("%s: symlink to %q, want %q", e.Path, str("link"), e.Link)
		}
		if e.Xattr != "" && str("xattr") != e.Xattr {
			t.Errorf("%s: xattr %q, want %q", e.Path, str("xattr"), e.Xattr)
		}
		if e.Rdev != "" && str("rdev") != e.Rdev {
			t.Errorf("%s: device %q, want %q", e.Path, str("rdev"), e.Rdev)
		}
		if e.SameAs != "" {
			other := files[e.SameAs]
			if other == nil || got["ino"] != other["ino"] || got["nlink"] != float64(2) {
				t.Errorf("%s: not a hard link of %s (%v vs %v)", e.Path, e.SameAs, got, other)
			}
		}
	}
}
