package builds

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/zeitwork/zeitwork/internal/build"
)

func TestScanLog(t *testing.T) {
	in := `{"seq":1,"time":"2025-01-02T03:04:05Z","stream":"zeitwork","line":"fetching source"}
not json
{"seq":2,"stream":"","line":"nul\u0000byte"}

{"seq":3,"line":"` + strings.Repeat("x", MaxLineBytes+10) + `"}
{"seq":4,"line":"` + strings.Repeat("y", maxWireLine) + `"}
{"seq":5,"line":"last, no newline"}`
	var got []build.LogLine
	if err := ScanLog(strings.NewReader(in), func(l build.LogLine) error { got = append(got, l); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 {
		t.Fatalf("%d lines: %+v", len(got), got)
	}
	if got[0].Stream != "zeitwork" || got[0].Line != "fetching source" || got[0].Time.Year() != 2025 {
		t.Errorf("line 1: %+v", got[0])
	}
	if got[1].Stream != "build" || got[1].Line != "nulbyte" {
		t.Errorf("line 2: %+v", got[1])
	}
	if got[2].Seq != 3 || len(got[2].Line) != MaxLineBytes {
		t.Errorf("line 3 is %d bytes", len(got[2].Line))
	}
	if got[3].Seq != 5 || got[3].Line != "last, no newline" {
		t.Errorf("line 5: %+v", got[3])
	}
	stop := errors.New("stop")
	if err := ScanLog(strings.NewReader(in), func(build.LogLine) error { return stop }); !errors.Is(err, stop) {
		t.Fatalf("fn's error: %v", err)
	}
}

func FuzzScanLog(f *testing.F) {
	f.Add([]byte(`{"seq":1,"time":"2025-01-02T03:04:05Z","stream":"build","line":"hi"}` + "\n"))
	f.Add([]byte("{\"line\":\"\\u0000\\ud800\"}\n\n{}"))
	f.Add([]byte("\xff\xfe{\"line\":\"\xff\"}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		err := ScanLog(bytes.NewReader(b), func(l build.LogLine) error {
			if !utf8.ValidString(l.Line) || strings.ContainsRune(l.Line, 0) || len(l.Line) > MaxLineBytes {
				t.Fatalf("line %q", l.Line)
			}
			if l.Stream == "" || !utf8.ValidString(l.Stream) || strings.ContainsRune(l.Stream, 0) || len(l.Stream) > maxStreamName {
				t.Fatalf("stream %q", l.Stream)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

func TestLogBounds(t *testing.T) {
	var l Log
	for i := range MaxLogLines + 500 {
		l.Add(build.LogLine{Seq: i + 1, Line: "x"})
	}
	lines := l.Lines()
	if len(lines) != MaxLogLines || l.Dropped != 500 || !l.Truncated() || lines[0].Seq != 501 || lines[len(lines)-1].Seq != MaxLogLines+500 {
		t.Fatalf("%d lines, %d dropped, first %d", len(lines), l.Dropped, lines[0].Seq)
	}
	var big Log
	long := strings.Repeat("z", MaxLineBytes)
	for i := range 200 {
		big.Add(build.LogLine{Seq: 7, Line: fmt.Sprint(i, long)}) // seq repeats: raised
	}
	total := 0
	for i, x := range big.Lines() {
		total += len(x.Line)
		if i > 0 && x.Seq <= big.Lines()[i-1].Seq {
			t.Fatal("seq not increasing")
		}
	}
	if total > MaxLogBytes || !strings.HasPrefix(big.Lines()[len(big.Lines())-1].Line, "199") {
		t.Fatalf("%d bytes kept", total)
	}
}

func tgz(t testing.TB, entries ...tar.Header) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for _, h := range entries {
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		_, _ = tw.Write(make([]byte, h.Size))
	}
	_ = tw.Close()
	_ = zw.Close()
	return buf.Bytes()
}

func TestCheckArchive(t *testing.T) {
	good := tgz(t, tar.Header{Name: "Dockerfile", Mode: 0o644, Size: 10, Typeflag: tar.TypeReg},
		tar.Header{Name: "link", Linkname: "../../etc/passwd", Typeflag: tar.TypeSymlink})
	if err := CheckArchive(good); err != nil {
		t.Fatal(err)
	}
	var plain bytes.Buffer
	zw := gzip.NewWriter(&plain)
	_, _ = zw.Write([]byte("just text, not a tar"))
	_ = zw.Close()
	corrupt := append([]byte(nil), good...)
	corrupt[len(corrupt)-6] ^= 0xff // the gzip CRC
	for name, tc := range map[string]struct {
		data []byte
		want string
	}{
		"not gzip":  {[]byte("PK\x03\x04zip"), "gzip"},
		"empty":     {nil, "gzip"},
		"not tar":   {plain.Bytes(), "tar"},
		"empty tar": {tgz(t), "empty"},
		"bad crc":   {corrupt, "gzip"},
	} {
		if err := CheckArchive(tc.data); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func FuzzCheckArchive(f *testing.F) {
	f.Add(tgz(f, tar.Header{Name: "a", Mode: 0o644, Size: 3, Typeflag: tar.TypeReg}))
	f.Add([]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = CheckArchive(b) // never panics, never hangs
	})
}

func TestValidGitURL(t *testing.T) {
	for _, ok := range []string{"", "https://github.com/acme/web.git", "http://10.0.0.5:3000/acme/web", "ssh://git@git.example.com:2222/acme/web.git",
		"git://git.example.com/web.git", "git@github.com:acme/web.git"} {
		if err := ValidGitURL(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"ext::sh -c id", "file:///etc", "/srv/git/web", "--upload-pack=x", "https://tok@github.com/a/b", "https://u:p@github.com/a/b",
		"https:///nohost", "https://github.com/a b", "fd::3", "git@host", "c:\\repo"} {
		if err := ValidGitURL(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func FuzzValidGitURL(f *testing.F) {
	for _, s := range []string{"https://github.com/acme/web.git", "git@github.com:acme/web.git", "ext::x", "-x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ValidGitURL(s) != nil || s == "" {
			return
		}
		if strings.HasPrefix(s, "-") || strings.ContainsAny(s, " \t\r\n\x00") || strings.HasPrefix(s, "ext::") || strings.HasPrefix(s, "file:") {
			t.Fatalf("accepted %q", s)
		}
	})
}

func TestNames(t *testing.T) {
	if got := RepoURL("https://github.com/", "acme/web", ""); got != "https://github.com/acme/web.git" {
		t.Error(got)
	}
	if got := RepoURL("https://github.com", "acme/web", "https://git.example.com/w.git"); got != "https://git.example.com/w.git" {
		t.Error(got)
	}
	if got := TargetImage("127.0.0.1:5005", "acme", "web", Tag("", strings.Repeat("ab", 32))); got != "127.0.0.1:5005/acme/web:src-abababababab" {
		t.Error(got)
	}
	if TargetImage("", "acme", "web", "x") != "" || !FullSHA(strings.Repeat("a", 40)) || FullSHA("abc1234") {
		t.Error("TargetImage or FullSHA")
	}
}

func TestPickNode(t *testing.T) {
	a := &node{id: uuid.MustParse("00000000-0000-0000-0000-00000000000a"), state: "ready", maxBuilds: 2, running: 1}
	b := &node{id: uuid.MustParse("00000000-0000-0000-0000-00000000000b"), state: "ready", maxBuilds: 4, running: 1}
	c := &node{id: uuid.MustParse("00000000-0000-0000-0000-00000000000c"), state: "draining", maxBuilds: 8}
	d := &node{id: uuid.MustParse("00000000-0000-0000-0000-00000000000d"), state: "ready", maxBuilds: 2, agentBusy: 2}
	nodes := map[uuid.UUID]*node{a.id: a, b.id: b, c.id: c, d.id: d}
	if n := pickNode(nodes, a.id); n != a {
		t.Fatalf("preferred node with a free slot: %v", n.id)
	}
	if n := pickNode(nodes, d.id); n != b {
		t.Fatalf("preferred node busy on the agent: %v", n.id)
	}
	if n := pickNode(nodes, uuid.Nil); n != b {
		t.Fatalf("most free slots: %v", n.id)
	}
	a.running, b.running = 2, 4
	if n := pickNode(nodes, uuid.Nil); n != nil {
		t.Fatalf("no free slot, got %v", n.id)
	}
}
