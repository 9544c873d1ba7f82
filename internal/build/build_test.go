package build

import (
	"errors"
	"path"
	"strings"
	"testing"
)

func valid() Spec {
	return Spec{ID: "b1", Source: Source{GitURL: "https://git.example/acme/web.git", CommitSHA: strings.Repeat("a", 40)},
		Image: "127.0.0.1:5000/acme/web:" + strings.Repeat("a", 40), TimeoutS: 900}
}

func TestValidate(t *testing.T) {
	s := valid()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	if s.Dockerfile != "Dockerfile" || s.Context != "." {
		t.Fatalf("defaults: %q %q", s.Dockerfile, s.Context)
	}
	for name, mut := range map[string]func(*Spec){
		"bad id":           func(s *Spec) { s.ID = "../x" },
		"no source":        func(s *Spec) { s.Source = Source{} },
		"both sources":     func(s *Spec) { s.Source.ArchivePath = "/x" },
		"short sha":        func(s *Spec) { s.Source.CommitSHA = "abc" },
		"option url":       func(s *Spec) { s.Source.GitURL = "-oProxyCommand=x" },
		"escaping context": func(s *Spec) { s.Context = "../.." },
		"absolute file":    func(s *Spec) { s.Dockerfile = "/etc/passwd" },
		"bad arg":          func(s *Spec) { s.BuildArgs = map[string]string{"1X": "v"} },
		"bad image":        func(s *Spec) { s.Image = "web" },
		"no timeout":       func(s *Spec) { s.TimeoutS = 0 },
		"tiny memory":      func(s *Spec) { s.MemoryMiB = 64 },
		"archive path":     func(s *Spec) { s.Source = Source{ArchivePath: "/a/../../b"} },
	} {
		s := valid()
		mut(&s)
		if err := s.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func FuzzRelPath(f *testing.F) {
	for _, s := range []string{"Dockerfile", "docker/Dockerfile.prod", "..", "../x", "/abs", "a/../../b", "a\\b", "./x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		if RelPath(p) != nil {
			return
		}
		c := path.Clean(p)
		if path.IsAbs(c) || c == ".." || strings.HasPrefix(c, "../") {
			t.Fatalf("accepted %q (clean %q)", p, c)
		}
	})
}
