package ocitest

import (
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/zeitwork/zeitwork/internal/imagebuild"
)

// Busybox is a small base image for builds from source
// (imagebuild.BusyboxLayer), so builds in tests never pull from the
// internet.
func Busybox(t testing.TB) v1.Image {
	t.Helper()
	l, err := imagebuild.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	img, err := imagebuild.Image(imagebuild.BusyboxConfig, l)
	if err != nil {
		t.Fatal(err)
	}
	return img
}
