package buildrunner

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func tarOf(t testing.TB, hs ...*tar.Header) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, h := range hs {
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(h.Name))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(h.Name))
		}
	}
	tw.Close()
	// A raw drive is zero-padded after the archive.
	return append(b.Bytes(), make([]byte, 4096)...)
}

func TestUntar(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(filepath.Dir(dir), "escaped")
	b := tarOf(t,
		&tar.Header{Name: "app/", Typeflag: tar.TypeDir, Mode: 0o755},
		&tar.Header{Name: "app/main.go", Typeflag: tar.TypeReg, Mode: 0o644},
		&tar.Header{Name: "run.sh", Typeflag: tar.TypeReg, Mode: 0o755},
		&tar.Header{Name: "link", Typeflag: tar.TypeSymlink, Linkname: "/etc"},
		&tar.Header{Name: "../escaped", Typeflag: tar.TypeReg, Mode: 0o644},
		&tar.Header{Name: "link/passwd", Typeflag: tar.TypeReg, Mode: 0o644},
		&tar.Header{Name: "dev", Typeflag: tar.TypeChar, Mode: 0o644},
	)
	n, err := Untar(bytes.NewReader(b), dir)
	if err == nil {
		// Writing through the symlink must fail (os.Root), not land in /etc.
		t.Fatalf("a write through a symlink to /etc was not refused (%d files)", n)
	}
	if _, err := os.Stat(outside); err == nil {
		t.Fatal("an entry escaped the directory")
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "app/main.go")); string(got) != "app/main.go" {
		t.Fatalf("main.go = %q", got)
	}
	if fi, _ := os.Stat(filepath.Join(dir, "run.sh")); fi == nil || fi.Mode()&0o111 == 0 {
		t.Fatal("run.sh lost its mode")
	}
}

func FuzzUntar(f *testing.F) {
	f.Add(tarOf(f, &tar.Header{Name: "a/b", Typeflag: tar.TypeReg}))
	f.Add(tarOf(f, &tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: "../../x"}, &tar.Header{Name: "l/y", Typeflag: tar.TypeReg}))
	f.Fuzz(func(t *testing.T, b []byte) {
		parent := t.TempDir()
		dir := filepath.Join(parent, "src")
		_, _ = Untar(bytes.NewReader(b), dir)
		ents, _ := os.ReadDir(parent)
		for _, e := range ents {
			if e.Name() != "src" {
				t.Fatalf("%s written outside the directory", e.Name())
			}
		}
	})
}

func TestWriteRegistries(t *testing.T) {
	dir := t.TempDir()
	if err := writeRegistries(dir, []string{"127.0.0.1:5000"}); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "registries.conf"))
	if !strings.Contains(string(b), "location = \"127.0.0.1:5000\"\ninsecure = true") || !strings.Contains(string(b), "short-name-mode = \"disabled\"") {
		t.Fatalf("%s", b)
	}
}

func TestSpotter(t *testing.T) {
	var out bytes.Buffer
	s := &spotter{w: &out, text: []byte("no space left on device")}
	for _, chunk := range []string{"dd: error writing '/fill': No space", " left on device\nwrite /x: no space le", "ft on device\n"} {
		s.Write([]byte(chunk))
	}
	if !s.seen || out.Len() == 0 {
		t.Fatalf("seen=%v out=%q", s.seen, out.String())
	}
	s2 := &spotter{w: &out, text: []byte("no space left on device")}
	s2.Write([]byte("all good\n"))
	if s2.seen {
		t.Fatal("false positive")
	}
}
