package rootfs

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// CleanName turns a tar entry name into a path relative to the image root.
// Absolute names and "../" segments are contained: "/../etc/x" becomes
// "etc/x". It returns "" for the root itself.
func CleanName(name string) string {
	p := path.Clean("/" + strings.ReplaceAll(name, "\\", "/"))
	return strings.TrimPrefix(p, "/")
}

// applyWhiteouts performs the deletions a layer asks for: ".wh.NAME"
// removes NAME from lower layers, ".wh..wh..opq" empties its directory of
// lower-layer content. It runs before the layer's files are extracted, so
// the layer's own entries survive.
func applyWhiteouts(root *os.Root, tr *tar.Reader) error {
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := CleanName(h.Name)
		dir, base := path.Split(name)
		dir = strings.TrimSuffix(dir, "/")
		switch {
		case base == opaqueMarker:
			if err := emptyDir(root, dir); err != nil {
				return fmt.Errorf("opaque %s: %w", dir, err)
			}
		case strings.HasPrefix(base, whiteoutPrefix):
			target := path.Join(dir, strings.TrimPrefix(base, whiteoutPrefix))
			if target == "" || target == "." {
				continue
			}
			if err := root.RemoveAll(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("whiteout %s: %w", target, err)
			}
		}
	}
}

func emptyDir(root *os.Root, dir string) error {
	if dir == "" {
		dir = "."
	}
	f, err := root.Open(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := root.RemoveAll(path.Join(dir, n)); err != nil {
			return err
		}
	}
	return nil
}

// extract writes a layer's entries through root, which keeps every write
// inside the image directory whatever symlinks earlier entries created.
func extract(root *os.Root, tr *tar.Reader, stats *Stats) error {
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := CleanName(h.Name)
		base := path.Base(name)
		if name == "" || strings.HasPrefix(base, whiteoutPrefix) {
			if name == "" && h.Typeflag == tar.TypeDir {
				_ = root.Chmod(".", fs.FileMode(h.Mode)&fs.ModePerm)
			}
			continue
		}
		if dir := path.Dir(name); dir != "." {
			if err := root.MkdirAll(dir, 0o755); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		}
		mode := h.FileInfo().Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
		perm := fs.FileMode(h.Mode) & fs.ModePerm
		switch h.Typeflag {
		case tar.TypeDir:
			if fi, err := root.Lstat(name); err == nil && !fi.IsDir() {
				_ = root.Remove(name)
			}
			if err := root.Mkdir(name, perm); err != nil && !errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("%s: %w", name, err)
			}
		case tar.TypeReg, tar.TypeRegA:
			if err := replace(root, name); err != nil {
				return err
			}
			f, err := root.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, perm)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			n, err := io.Copy(f, tr)
			if err == nil {
				err = setXattrs(f, h)
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			stats.Bytes += n
		case tar.TypeSymlink:
			// The target is stored verbatim (it may point anywhere, e.g.
			// "/etc/x" or "../../x"); it is only ever resolved inside the VM.
			if err := replace(root, name); err != nil {
				return err
			}
			if err := root.Symlink(h.Linkname, name); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		case tar.TypeLink:
			target := CleanName(h.Linkname)
			if target == "" {
				return fmt.Errorf("%s: hard link to the root", name)
			}
			if err := replace(root, name); err != nil {
				return err
			}
			if err := root.Link(target, name); err != nil {
				return fmt.Errorf("%s: hard link to %s: %w", name, target, err)
			}
			stats.Files++
			continue // ownership and mode belong to the target
		default:
			// Device nodes, FIFOs: the VM's devtmpfs provides devices.
			stats.Skipped++
			continue
		}
		stats.Files++
		if err := root.Lchown(name, h.Uid, h.Gid); err != nil {
			return fmt.Errorf("%s: chown: %w", name, err)
		}
		if h.Typeflag != tar.TypeSymlink {
			if err := root.Chmod(name, mode); err != nil {
				return fmt.Errorf("%s: chmod: %w", name, err)
			}
			_ = root.Chtimes(name, h.ModTime, h.ModTime)
		}
	}
}

// replace removes whatever is at name unless it is a directory (a file
// replacing a directory removes the directory tree).
func replace(root *os.Root, name string) error {
	fi, err := root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if fi.IsDir() {
		return root.RemoveAll(name)
	}
	return root.Remove(name)
}

func setXattrs(f *os.File, h *tar.Header) error {
	for k, v := range h.PAXRecords {
		key, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		if err := unix.Fsetxattr(int(f.Fd()), key, []byte(v), 0); err != nil && !errors.Is(err, unix.ENOTSUP) {
			return fmt.Errorf("xattr %s: %w", key, err)
		}
	}
	return nil
}
