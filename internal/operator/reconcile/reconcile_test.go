package reconcile

import (
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
)

func TestPinned(t *testing.T) {
	const d = "sha256:0123"
	for _, tc := range []struct{ in, want string }{
		{"ghcr.io/acme/web:v1", "ghcr.io/acme/web@" + d},
		{"localhost:5000/acme/web:abc", "localhost:5000/acme/web@" + d},
		{"localhost:5000/acme/web", "localhost:5000/acme/web@" + d},
		{"127.0.0.1:5000/web@sha256:ffff", "127.0.0.1:5000/web@" + d},
		{"nginx", "nginx@" + d},
	} {
		if got := pinned(tc.in, d); got != tc.want {
			t.Errorf("pinned(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func FuzzPinned(f *testing.F) {
	for _, s := range []string{"ghcr.io/acme/web:v1", "localhost:5000/a/b", "nginx@sha256:" + strings.Repeat("a", 64)} {
		f.Add(s)
	}
	digest := "sha256:" + strings.Repeat("0", 64)
	f.Fuzz(func(t *testing.T, image string) {
		ref, err := name.ParseReference(image, name.StrictValidation)
		if err != nil {
			return // resolve rejects it before anything is pinned
		}
		got, err := name.NewDigest(pinned(image, digest), name.StrictValidation)
		if err != nil || got.DigestStr() != digest || got.Context().String() != ref.Context().String() {
			t.Fatalf("pinned(%q) = %v, %v", image, got, err)
		}
	})
}
