package builderimage

import (
	"strings"
	"testing"
)

func TestParseSimulation(t *testing.T) {
	out := []byte(`NOTE: This is only a simulation!
Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.12/stable [amd64])
Inst libc6 (2.36-9+deb12u13 Debian:12.12/stable, Debian-Security:12/stable-security [amd64])
Conf libc6 (2.36-9+deb12u13 Debian:12.12/stable [amd64])
Inst buildah (1.28.2+ds1-3+deb12u1+b3 Debian:12.12/stable [amd64])
`)
	pkgs, err := parseSimulation(out)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(pkgs, " ") != "gcc-12-base=12.2.0-14+deb12u1 libc6=2.36-9+deb12u13 buildah=1.28.2+ds1-3+deb12u1+b3" {
		t.Fatalf("%v", pkgs)
	}
	if _, err := parseSimulation([]byte("E: Unable to locate package buildah\n")); err == nil {
		t.Fatal("no packages accepted")
	}
}

func FuzzParseSimulation(f *testing.F) {
	f.Add([]byte("Inst a (1 x [amd64])\n"))
	f.Add([]byte("Inst -o (1)\nInst b/c (2)\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		pkgs, err := parseSimulation(b)
		if err != nil {
			return
		}
		for _, p := range pkgs {
			name, version, ok := strings.Cut(p, "=")
			if !ok || name == "" || version == "" || strings.HasPrefix(name, "-") || strings.ContainsAny(p, " \t/\n") {
				t.Fatalf("unsafe package argument %q", p)
			}
		}
	})
}
