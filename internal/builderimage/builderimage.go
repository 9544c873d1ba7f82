// Package builderimage provides the root disk of builder microVMs: Debian's
// buildah and the packages it depends on (resolved by apt against an empty
// package database, so the closure is complete, fetched with apt-get
// download and unpacked with dpkg-deb, never installed on the host), this
// tree's zeitwork-init as /usr/local/bin/zeitwork-init (the build runner
// inside the VM), and the containers configuration the runner completes
// per build. The ext4 image is cached by a key over the package versions
// and the init binary, built once per node and shared read-only by every
// builder VM (each boots a copy-on-write overlay of it).
package builderimage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/rootfs"
)

// Packages are the Debian packages the builder image is made of (with
// their dependencies).
var Packages = []string{"buildah"}

// InitPath is where the build runner lives in the image.
const InitPath = "/usr/local/bin/zeitwork-init"

// format changes when the image layout changes, so old caches are rebuilt.
const format = "2"

// Ensure returns the builder root disk in dir, building it when absent.
// Concurrent callers (several agents or test binaries) are serialised with
// a file lock; images of other keys are removed once a new one is ready.
func Ensure(ctx context.Context, dir, initBinary string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", err
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)

	initBytes, err := os.ReadFile(initBinary)
	if err != nil {
		return "", fmt.Errorf("cannot read init binary: %w", err)
	}
	pkgs, err := closure(ctx)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "format %s\n", format)
	for _, p := range pkgs {
		fmt.Fprintf(h, "%s\n", p)
	}
	h.Write(initBytes)
	key := hex.EncodeToString(h.Sum(nil)[:10])
	img := filepath.Join(dir, "builder-"+key+".ext4")
	if _, err := os.Stat(img); err == nil {
		return img, nil
	}
	tmp, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	_ = os.Chmod(tmp, 0o777) // apt's _apt user downloads into it
	names := make([]string, len(pkgs))
	for i, p := range pkgs {
		names[i], _, _ = strings.Cut(p, "=")
	}
	debs := filepath.Join(tmp, "debs")
	if err := os.Mkdir(debs, 0o777); err != nil {
		return "", err
	}
	_ = os.Chmod(debs, 0o777) // past the umask, for the _apt user
	if out, err := run(ctx, debs, "apt-get", append([]string{"download", "-q"}, pkgs...)...); err != nil {
		return "", fmt.Errorf("apt-get download: %v: %s", err, tail(out))
	}
	tree := filepath.Join(tmp, "root")
	files, _ := filepath.Glob(filepath.Join(debs, "*.deb"))
	if len(files) != len(pkgs) {
		return "", fmt.Errorf("apt-get download fetched %d of %d packages", len(files), len(pkgs))
	}
	for _, f := range files {
		if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", f, tree).CombinedOutput(); err != nil {
			return "", fmt.Errorf("dpkg-deb -x %s: %v: %s", filepath.Base(f), err, tail(out))
		}
	}
	version := "buildah"
	for _, p := range pkgs {
		if v, ok := strings.CutPrefix(p, "buildah="); ok {
			version = "buildah " + v
		}
	}
	if err := finish(tree, initBytes, version); err != nil {
		return "", err
	}
	// The loader's cache, so every library directory of the image is found.
	if out, err := exec.CommandContext(ctx, "ldconfig", "-r", tree).CombinedOutput(); err != nil {
		return "", fmt.Errorf("ldconfig: %v: %s", err, tail(out))
	}
	part := img + ".part"
	if err := rootfs.MakeExt4(ctx, tree, part, 32<<20); err != nil {
		return "", err
	}
	if err := os.Rename(part, img); err != nil {
		return "", err
	}
	old, _ := filepath.Glob(filepath.Join(dir, "builder-*.ext4"))
	for _, o := range old {
		if o != img {
			_ = os.Remove(o)
		}
	}
	return img, nil
}

// closure lists the packages (name=version) apt would install for
// Packages on an empty system.
func closure(ctx context.Context) ([]string, error) {
	args := append([]string{"-s", "-q", "-o", "Dir::State::status=/dev/null", "-o", "APT::Install-Recommends=false", "install"}, Packages...)
	out, err := exec.CommandContext(ctx, "apt-get", args...).CombinedOutput()
	if err != nil {
		// The package lists may be missing on a fresh machine.
		if upd, uerr := exec.CommandContext(ctx, "apt-get", "update", "-q").CombinedOutput(); uerr != nil {
			return nil, fmt.Errorf("apt-get update: %v: %s", uerr, tail(upd))
		}
		if out, err = exec.CommandContext(ctx, "apt-get", args...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("cannot resolve %s with apt-get: %v: %s", strings.Join(Packages, " "), err, tail(out))
		}
	}
	pkgs, err := parseSimulation(out)
	if err != nil {
		return nil, err
	}
	sort.Strings(pkgs)
	return pkgs, nil
}

// parseSimulation reads `apt-get -s install` output: lines
// "Inst NAME (VERSION REPO [ARCH])".
func parseSimulation(out []byte) ([]string, error) {
	var pkgs []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "Inst" || !strings.HasPrefix(f[2], "(") {
			continue
		}
		name, version := f[1], strings.TrimPrefix(f[2], "(")
		if strings.ContainsAny(name+version, "/ \t") || strings.HasPrefix(name, "-") || version == "" {
			return nil, fmt.Errorf("unexpected apt-get line %q", line)
		}
		pkgs = append(pkgs, name+"="+version)
	}
	if len(pkgs) == 0 {
		return nil, errors.New("apt-get resolved no packages for the builder image")
	}
	return pkgs, nil
}

// finish completes the unpacked tree: init, mount points, configuration,
// and nothing a build never reads (documentation, manuals, locales).
func finish(tree string, initBytes []byte, version string) error {
	for _, d := range []string{"usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"} {
		if err := os.RemoveAll(filepath.Join(tree, d)); err != nil {
			return err
		}
	}
	for _, d := range []string{"proc", "sys", "dev", "tmp", "run", "var/tmp", "work", "etc/containers", "root", "usr/local/bin"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			return err
		}
	}
	_ = os.Chmod(filepath.Join(tree, "tmp"), 0o1777)
	_ = os.Chmod(filepath.Join(tree, "var/tmp"), 0o1777)
	files := map[string]string{
		"etc/containers/policy.json": `{"default":[{"type":"insecureAcceptAnything"}]}` + "\n",
		"etc/passwd":                 "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":                  "root:x:0:\n",
		"etc/hosts":                  "127.0.0.1\tlocalhost\n",
		"etc/resolv.conf":            "",
		"etc/nsswitch.conf":          "passwd: files\ngroup: files\nhosts: files\n",
		"etc/zeitwork-builder":       version + "\n",
	}
	for name, content := range files {
		p := filepath.Join(tree, name)
		_ = os.Remove(p)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return err
		}
	}
	return os.WriteFile(filepath.Join(tree, InitPath), initBytes, 0o755)
}

func run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	c := exec.CommandContext(ctx, name, args...)
	c.Dir = dir
	var b bytes.Buffer
	c.Stdout, c.Stderr = &b, &b
	err := c.Run()
	return b.Bytes(), err
}

func tail(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 600 {
		s = s[len(s)-600:]
	}
	return s
}
