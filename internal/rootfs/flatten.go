package rootfs

import (
	"archive/tar"
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
)

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
	maxLinkFollows = 64
)

// Stats counts what a flattening wrote.
type Stats struct {
	Files   int   // entries written (files, dirs, links, nodes)
	Bytes   int64 // regular file content
	Skipped int   // entries that cannot exist in an image (sockets, unknown types)
	Removed int   // whiteouts and opaque directories applied
}

// ErrTooLarge means an image's content exceeds the configured bound.
var ErrTooLarge = errors.New("image content exceeds the size limit")

// CleanName turns a tar entry name into a path relative to the image root.
// Absolute names and "../" segments are contained, never followed out of
// the root: "/../etc/x" and "../../etc/x" both become "etc/x". It returns
// "" for the root itself.
func CleanName(name string) string {
	p := path.Clean("/" + strings.ReplaceAll(name, "\\", "/"))
	return strings.TrimPrefix(p, "/")
}

// Flatten extracts img's layers, bottom first, into dir. maxBytes bounds
// the regular file content written (0 = unbounded).
func Flatten(ctx context.Context, img v1.Image, dir string, maxBytes int64) (Stats, error) {
	var st Stats
	layers, err := img.Layers()
	if err != nil {
		return st, fmt.Errorf("cannot list layers: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return st, err
	}
	defer root.Close()
	x := &extractor{root: root, stats: &st, maxBytes: maxBytes, buf: make([]byte, 1<<20)}
	for i, l := range layers {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		rc, err := l.Uncompressed()
		if err != nil {
			return st, fmt.Errorf("layer %d: %w", i, err)
		}
		err = x.layer(ctx, tar.NewReader(bufio.NewReaderSize(rc, 1<<20)))
		rc.Close()
		if err != nil {
			return st, fmt.Errorf("layer %d: %w", i, err)
		}
	}
	return st, nil
}

// FlattenTar applies one uncompressed layer stream to dir (the bottom layer
// when dir is empty); tests and tools use it without a registry.
func FlattenTar(ctx context.Context, r io.Reader, dir string) (Stats, error) {
	var st Stats
	root, err := os.OpenRoot(dir)
	if err != nil {
		return st, err
	}
	defer root.Close()
	x := &extractor{root: root, stats: &st, buf: make([]byte, 1<<20)}
	return st, x.layer(ctx, tar.NewReader(r))
}

// extractor applies layers through an os.Root: no write can leave the
// image directory, whatever names and symlinks the layers contain.
type extractor struct {
	root     *os.Root
	stats    *Stats
	maxBytes int64
	buf      []byte
	// seen holds the paths the current layer created: its own whiteouts and
	// opaque markers must not remove them (they only hide lower layers).
	seen map[string]bool
}

// layer applies one layer in a single pass.
func (x *extractor) layer(ctx context.Context, tr *tar.Reader) error {
	x.seen = map[string]bool{}
	for n := 0; ; n++ {
		if n%1024 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("cannot read layer: %w", err)
		}
		if err := x.entry(h, tr); err != nil {
			return err
		}
	}
}

func (x *extractor) entry(h *tar.Header, r io.Reader) error {
	name := CleanName(h.Name)
	if name == "" { // the root directory itself
		if h.Typeflag == tar.TypeDir {
			return x.attrs(".", h)
		}
		return nil
	}
	dir, base := path.Split(name)
	parent, err := x.resolve(strings.TrimSuffix(dir, "/"))
	if err != nil {
		return fmt.Errorf("%s: %w", h.Name, err)
	}
	switch {
	case base == opaqueMarker:
		x.stats.Removed++
		return x.opaque(parent)
	case strings.HasPrefix(base, whiteoutPrefix):
		target := path.Join(parent, strings.TrimPrefix(base, whiteoutPrefix))
		x.stats.Removed++
		if x.seen[target] {
			return nil
		}
		if err := x.root.RemoveAll(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("whiteout %s: %w", target, err)
		}
		return nil
	}
	p := path.Join(parent, base)
	if parent != "" {
		if err := x.root.MkdirAll(parent, 0o755); err != nil {
			return fmt.Errorf("%s: %w", h.Name, err)
		}
	}
	x.markSeen(p)
	switch h.Typeflag {
	case tar.TypeDir:
		if fi, err := x.root.Lstat(p); err == nil && fi.IsDir() {
			return x.attrs(p, h) // directories merge
		}
		if err := x.clear(p); err != nil {
			return err
		}
		if err := x.root.Mkdir(p, 0o700); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	case tar.TypeReg: // the reader reports old-style TypeRegA entries as TypeReg
		if err := x.clear(p); err != nil {
			return err
		}
		if x.maxBytes > 0 && x.stats.Bytes+h.Size > x.maxBytes {
			return fmt.Errorf("%s: %w (%d bytes)", p, ErrTooLarge, x.maxBytes)
		}
		f, err := x.root.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		n, err := io.CopyBuffer(f, io.LimitReader(r, h.Size), x.buf)
		if err == nil && n != h.Size {
			err = io.ErrUnexpectedEOF
		}
		if err == nil {
			err = setXattrs(f, h)
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		x.stats.Bytes += n
	case tar.TypeSymlink:
		// The target is stored verbatim, wherever it points ("/etc/x",
		// "../../x"): it is resolved only inside the VM. Writes through it
		// are resolved within the image (see resolve), never on the host.
		if err := x.clear(p); err != nil {
			return err
		}
		if err := x.root.Symlink(h.Linkname, p); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	case tar.TypeLink:
		ldir, lbase := path.Split(CleanName(h.Linkname))
		lparent, err := x.resolve(strings.TrimSuffix(ldir, "/"))
		if err != nil || lbase == "" {
			return fmt.Errorf("%s: bad hard link target %q", p, h.Linkname)
		}
		target := path.Join(lparent, lbase)
		if target == p {
			return nil
		}
		if err := x.clear(p); err != nil {
			return err
		}
		if err := x.root.Link(target, p); err != nil {
			return fmt.Errorf("%s: hard link to %s: %w", p, target, err)
		}
		x.stats.Files++
		return nil // mode and owner belong to the target's inode
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		if err := x.clear(p); err != nil {
			return err
		}
		if err := x.mknod(parent, base, h); errors.Is(err, unix.EPERM) {
			x.stats.Skipped++ // unprivileged: the VM's devtmpfs provides devices
			delete(x.seen, p)
			return nil
		} else if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	default: // sockets, unknown and vendor types
		x.stats.Skipped++
		delete(x.seen, p)
		return nil
	}
	x.stats.Files++
	return x.attrs(p, h)
}

// markSeen records that the current layer wrote p, and so its parents.
func (x *extractor) markSeen(p string) {
	for p != "" && p != "." && !x.seen[p] {
		x.seen[p] = true
		p = path.Dir(p)
	}
}

// attrs applies ownership, mode, xattrs (directories; files get theirs
// through their descriptor) and mtime. Ownership comes first: chown clears
// setuid/setgid bits.
func (x *extractor) attrs(p string, h *tar.Header) error {
	if err := x.root.Lchown(p, h.Uid, h.Gid); err != nil {
		return fmt.Errorf("%s: chown: %w", p, err)
	}
	if h.Typeflag == tar.TypeSymlink {
		return nil
	}
	mode := fs.FileMode(h.Mode) & fs.ModePerm
	if h.Mode&0o4000 != 0 {
		mode |= fs.ModeSetuid
	}
	if h.Mode&0o2000 != 0 {
		mode |= fs.ModeSetgid
	}
	if h.Mode&0o1000 != 0 {
		mode |= fs.ModeSticky
	}
	if err := x.root.Chmod(p, mode); err != nil {
		return fmt.Errorf("%s: chmod: %w", p, err)
	}
	if h.Typeflag == tar.TypeDir && hasXattrs(h) {
		d, err := x.root.Open(p)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		err = setXattrs(d, h)
		d.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	}
	_ = x.root.Chtimes(p, h.ModTime, h.ModTime)
	return nil
}

// clear removes whatever is at p, so a new entry can take its place.
func (x *extractor) clear(p string) error {
	fi, err := x.root.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	if fi.IsDir() {
		err = x.root.RemoveAll(p)
	} else {
		err = x.root.Remove(p)
	}
	if err != nil {
		return fmt.Errorf("%s: cannot replace: %w", p, err)
	}
	return nil
}

// opaque empties dir of everything lower layers put there, keeping what
// the current layer has already written.
func (x *extractor) opaque(dir string) error {
	d := dir
	if d == "" {
		d = "."
	}
	f, err := x.root.Open(d)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("opaque %s: %w", d, err)
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return fmt.Errorf("opaque %s: %w", d, err)
	}
	for _, n := range names {
		child := path.Join(dir, n)
		if !x.seen[child] {
			if err := x.root.RemoveAll(child); err != nil {
				return fmt.Errorf("opaque %s: %w", d, err)
			}
			continue
		}
		if fi, err := x.root.Lstat(child); err == nil && fi.IsDir() {
			if err := x.opaque(child); err != nil {
				return err
			}
		}
	}
	return nil
}

// resolve returns the real path of directory p inside the image: symlinks
// among its components are followed the way the VM will see them —
// absolute targets from the image root, ".." never above it — so that an
// entry written "through" a symlink lands where the guest expects, and
// never outside the image. Components that do not exist yet are kept as
// they are (they are created as directories).
func (x *extractor) resolve(p string) (string, error) {
	if p == "" {
		return "", nil
	}
	pending := strings.Split(p, "/")
	var cur []string
	follows := 0
	for len(pending) > 0 {
		c := pending[0]
		pending = pending[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(cur) > 0 {
				cur = cur[:len(cur)-1]
			}
			continue
		}
		next := strings.Join(append(cur, c), "/")
		fi, err := x.root.Lstat(next)
		if errors.Is(err, fs.ErrNotExist) {
			cur = append(cur, c)
			continue
		}
		if err != nil {
			return "", err
		}
		switch {
		case fi.IsDir():
			cur = append(cur, c)
		case fi.Mode()&fs.ModeSymlink != 0:
			if follows++; follows > maxLinkFollows {
				return "", fmt.Errorf("too many levels of symbolic links at %s", next)
			}
			target, err := x.root.Readlink(next)
			if err != nil {
				return "", err
			}
			if strings.HasPrefix(target, "/") {
				cur = cur[:0]
			}
			pending = append(strings.Split(target, "/"), pending...)
		default:
			return "", fmt.Errorf("%s is not a directory", next)
		}
	}
	return strings.Join(cur, "/"), nil
}

// mknod creates a device node or FIFO in dir through a descriptor of dir
// opened inside the root.
func (x *extractor) mknod(dir, base string, h *tar.Header) error {
	d := dir
	if d == "" {
		d = "."
	}
	f, err := x.root.Open(d)
	if err != nil {
		return err
	}
	defer f.Close()
	mode := uint32(h.Mode & 0o7777)
	switch h.Typeflag {
	case tar.TypeChar:
		mode |= unix.S_IFCHR
	case tar.TypeBlock:
		mode |= unix.S_IFBLK
	default:
		mode |= unix.S_IFIFO
	}
	dev := unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor))
	return unix.Mknodat(int(f.Fd()), base, mode, int(dev))
}

func hasXattrs(h *tar.Header) bool {
	for k := range h.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") {
			return true
		}
	}
	return false
}

// setXattrs copies a tar entry's extended attributes (PAX SCHILY.xattr.*)
// to f. Filesystems without xattr support skip them.
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
