// Package guestkernel provides the guest kernel and initramfs every microVM
// boots: Debian's cloud kernel (fetched with apt-get download, never
// installed on the host), the same kernel as an uncompressed ELF vmlinux
// (Firecracker boots only that; see vmlinux.go), and an uncompressed
// initramfs holding zeitwork-init as /init plus the virtio modules it
// loads. All are cached
// in a directory and rebuilt only when the kernel package or the init
// binary changes. See docs/adr/0003-guest-kernel.md.
package guestkernel

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
	"strings"

	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/fsutil"
)

// Modules copied into the initramfs, in load order (see zeitwork-init).
var Modules = []string{
	"drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_mmio",
	"drivers/block/virtio_blk", "net/core/failover", "drivers/net/net_failover",
	"drivers/net/virtio_net", "drivers/char/virtio_console",
	"net/vmw_vsock/vsock", "net/vmw_vsock/vmw_vsock_virtio_transport_common", "net/vmw_vsock/vmw_vsock_virtio_transport",
	"fs/overlayfs/overlay", // the builder's container storage
}

// Package is the Debian metapackage whose dependency names the kernel.
const Package = "linux-image-cloud-amd64"

// Kernel is a ready guest kernel.
type Kernel struct {
	Version string // e.g. 6.1.0-56-cloud-amd64
	BzImage string // compressed kernel (QEMU -kernel)
	Vmlinux string // the same kernel as an uncompressed ELF (Firecracker)
	Initrd  string // initramfs with zeitwork-init
}

// Ensure returns the cached kernel in dir, fetching it first when absent,
// and an initramfs for initBinary. Concurrent callers (several test
// binaries, several agents) are serialised with a file lock.
func Ensure(ctx context.Context, dir, initBinary string) (*Kernel, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return nil, err
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)

	kdir, err := ensurePackage(ctx, dir)
	if err != nil {
		return nil, err
	}
	version := filepath.Base(kdir)
	k := &Kernel{Version: version, BzImage: filepath.Join(kdir, "vmlinuz")}
	if k.Vmlinux, err = EnsureVmlinux(k.BzImage); err != nil {
		return nil, err
	}
	initBytes, err := os.ReadFile(initBinary)
	if err != nil {
		return nil, fmt.Errorf("cannot read init binary: %w", err)
	}
	sum := sha256.Sum256(append(initBytes, strings.Join(Modules, "\n")...))
	k.Initrd = filepath.Join(kdir, "initramfs-"+hex.EncodeToString(sum[:8])+".cpio")
	if _, err := os.Stat(k.Initrd); err == nil {
		return k, nil
	}
	var files []cpioFile
	files = append(files, cpioFile{name: "init", mode: 0o755, data: initBytes})
	files = append(files, cpioFile{name: "lib", dir: true}, cpioFile{name: "lib/modules", dir: true})
	for _, m := range Modules {
		data, err := os.ReadFile(filepath.Join(kdir, "modules", filepath.Base(m)+".ko"))
		if err != nil {
			continue // built in, or absent in this kernel
		}
		files = append(files, cpioFile{name: "lib/modules/" + filepath.Base(m) + ".ko", mode: 0o644, data: data})
	}
	for _, d := range []string{"dev", "proc", "sys", "newroot", "tmp"} {
		files = append(files, cpioFile{name: d, dir: true})
	}
	var buf bytes.Buffer
	if err := writeCpio(&buf, files); err != nil {
		return nil, err
	}
	if err := fsutil.WriteFile(k.Initrd, buf.Bytes(), 0o644); err != nil {
		return nil, err
	}
	return k, nil
}

// ensurePackage downloads and unpacks the kernel package once; it returns
// dir/<version> holding vmlinuz and modules/.
func ensurePackage(ctx context.Context, dir string) (string, error) {
	if cur, err := os.ReadFile(filepath.Join(dir, "current")); err == nil {
		kdir := filepath.Join(dir, strings.TrimSpace(string(cur)))
		listed, _ := os.ReadFile(filepath.Join(kdir, "modules.list"))
		if _, err := os.Stat(filepath.Join(kdir, "vmlinuz")); err == nil && string(listed) == strings.Join(Modules, "\n") {
			return kdir, nil
		}
	}
	tmp, err := os.MkdirTemp(dir, "fetch-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	_ = os.Chmod(tmp, 0o777) // apt's _apt user downloads into it
	pkg, err := kernelPackageName(ctx)
	if err != nil {
		return "", err
	}
	if _, err := run(ctx, tmp, "apt-get", "download", "-q", pkg); err != nil {
		// The package lists may be missing on a fresh machine.
		if upd, uerr := run(ctx, tmp, "apt-get", "update", "-q"); uerr != nil {
			return "", fmt.Errorf("apt-get update: %v: %s", uerr, tailOf(upd))
		}
		if out, err := run(ctx, tmp, "apt-get", "download", "-q", pkg); err != nil {
			return "", fmt.Errorf("apt-get download %s: %v: %s", pkg, err, tailOf(out))
		}
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("apt-get download %s produced %d packages", pkg, len(debs))
	}
	x := filepath.Join(tmp, "x")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], x).CombinedOutput(); err != nil {
		return "", fmt.Errorf("dpkg-deb -x: %v: %s", err, tailOf(out))
	}
	vmlinuz, _ := filepath.Glob(filepath.Join(x, "boot", "vmlinuz-*"))
	if len(vmlinuz) != 1 {
		return "", errors.New("kernel package holds no vmlinuz")
	}
	version := strings.TrimPrefix(filepath.Base(vmlinuz[0]), "vmlinuz-")
	stage := filepath.Join(tmp, version)
	if err := os.MkdirAll(filepath.Join(stage, "modules"), 0o755); err != nil {
		return "", err
	}
	if err := os.Rename(vmlinuz[0], filepath.Join(stage, "vmlinuz")); err != nil {
		return "", err
	}
	for _, m := range Modules {
		src := filepath.Join(x, "lib", "modules", version, "kernel", m+".ko")
		if _, err := os.Stat(src); err != nil {
			continue
		}
		if err := os.Rename(src, filepath.Join(stage, "modules", filepath.Base(m)+".ko")); err != nil {
			return "", err
		}
	}
	// Which modules were looked for: a later list triggers a new fetch.
	if err := os.WriteFile(filepath.Join(stage, "modules.list"), []byte(strings.Join(Modules, "\n")), 0o644); err != nil {
		return "", err
	}
	final := filepath.Join(dir, version)
	_ = os.RemoveAll(final)
	if err := os.Rename(stage, final); err != nil {
		return "", err
	}
	if err := fsutil.WriteFile(filepath.Join(dir, "current"), []byte(version+"\n"), 0o644); err != nil {
		return "", err
	}
	return final, nil
}

func run(ctx context.Context, dir string, name string, args ...string) ([]byte, error) {
	c := exec.CommandContext(ctx, name, args...)
	c.Dir = dir
	return c.CombinedOutput()
}

// kernelPackageName resolves the metapackage to the versioned image package.
func kernelPackageName(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", Package).Output()
	if err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
				return f[1], nil
			}
		}
	}
	if _, uerr := exec.CommandContext(ctx, "apt-get", "update", "-q").CombinedOutput(); uerr == nil {
		out, err = exec.CommandContext(ctx, "apt-cache", "depends", Package).Output()
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
				return f[1], nil
			}
		}
	}
	return "", fmt.Errorf("cannot resolve %s with apt-cache: %v", Package, err)
}

func tailOf(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 400 {
		s = s[len(s)-400:]
	}
	return s
}
