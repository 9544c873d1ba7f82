package names

import (
	"strings"
	"testing"
)

func TestValidLabel(t *testing.T) {
	for _, ok := range []string{"a", "web", "my-app-2", strings.Repeat("a", 63)} {
		if err := ValidLabel(ok); err != nil {
			t.Errorf("ValidLabel(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-a", "a-", "A", "a_b", "a.b", strings.Repeat("a", 64), "ü"} {
		if ValidLabel(bad) == nil {
			t.Errorf("ValidLabel(%q) accepted", bad)
		}
	}
}

func TestVersionedLabel(t *testing.T) {
	if got := VersionedLabel("dokedu", "a7x9k2m", "dokedu"); got != "dokedu-a7x9k2m-dokedu" {
		t.Fatalf("got %q", got)
	}
	long := VersionedLabel(strings.Repeat("p", 63), "a7x9k2m", strings.Repeat("o", 63))
	if len(long) > 63 || !strings.Contains(long, "-a7x9k2m-") || ValidLabel(long) != nil {
		t.Fatalf("long label %q (%d)", long, len(long))
	}
	cutHyphen := VersionedLabel("ab-"+strings.Repeat("c", 60), "0000000", "org")
	if ValidLabel(cutHyphen) != nil || len(cutHyphen) > 63 {
		t.Fatalf("%q", cutHyphen)
	}
}

func FuzzVersionedLabel(f *testing.F) {
	f.Add("web", "acme")
	f.Add(strings.Repeat("a-", 31)+"b", strings.Repeat("c", 63))
	f.Fuzz(func(t *testing.T, p, o string) {
		if ValidLabel(p) != nil || ValidLabel(o) != nil {
			return
		}
		id := NanoID()
		l := VersionedLabel(p, id, o)
		if len(l) > 63 || !strings.Contains(l, "-"+id+"-") || ValidLabel(l) != nil {
			t.Fatalf("VersionedLabel(%q, %q) = %q", p, o, l)
		}
		if a := AliasLabel(p, o); len(a) > 63 || ValidLabel(a) != nil {
			t.Fatalf("AliasLabel(%q, %q) = %q", p, o, a)
		}
	})
}

func FuzzNormalizeDomain(f *testing.F) {
	for _, s := range []string{"app.example.com", "EXAMPLE.org.", "a..b", "-x.com", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := NormalizeDomain(s)
		if err != nil {
			return
		}
		if len(d) > 253 || strings.ToLower(d) != d || strings.HasSuffix(d, ".") {
			t.Fatalf("NormalizeDomain(%q) = %q", s, d)
		}
		for _, l := range strings.Split(d, ".") {
			if ValidLabel(l) != nil {
				t.Fatalf("label %q of %q", l, d)
			}
		}
	})
}

func TestNanoID(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		id := NanoID()
		if len(id) != 7 || strings.Trim(id, nanoAlphabet) != "" || seen[id] {
			t.Fatalf("bad or repeated id %q", id)
		}
		seen[id] = true
	}
}
