// Package rootfs turns OCI images into the ext4 root disks microVMs boot.
// It pulls an image (go-containerregistry), flattens its layers in order —
// whiteouts, opaque directories, hard links, symlinks, modes, ownership and
// xattrs — writing only through an os.Root so no entry can escape, and
// builds an ext4 image with `mkfs.ext4 -d`. Images are cached by manifest
// digest, built atomically (temp + rename), once for concurrent requests,
// and evicted least-recently-used beyond a size bound (never while in use).
package rootfs

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"archive/tar"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/singleflight"
)

// Stats counts what a conversion wrote.
type Stats struct {
	Files   int
	Bytes   int64
	Skipped int
}

// Image is a converted image.
type Image struct {
	Digest string `json:"digest"`
	Path   string `json:"path"` // ext4 file
	Size   int64  `json:"size"`
	Config Config `json:"config"`
}

// Config is what the VM's init needs from the image config.
type Config struct {
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	Env        []string `json:"env,omitempty"`
	WorkDir    string   `json:"workdir,omitempty"`
	User       string   `json:"user,omitempty"`
	UID        uint32   `json:"uid"`
	GID        uint32   `json:"gid"`
}

// Store is the on-disk cache of converted images.
type Store struct {
	Dir      string
	MaxBytes int64 // eviction bound; 0 = unbounded
	// Insecure lists registries reachable over plain HTTP; loopback
	// registries always are.
	Insecure []string

	sf    singleflight.Group
	mu    sync.Mutex
	inUse map[string]int
}

// NewStore opens (creating) a cache in dir and removes leftovers of
// interrupted conversions.
func NewStore(dir string, maxBytes int64, insecure []string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	tmps, _ := filepath.Glob(filepath.Join(dir, "tmp-*"))
	for _, t := range tmps {
		_ = os.RemoveAll(t)
	}
	return &Store{Dir: dir, MaxBytes: maxBytes, Insecure: insecure, inUse: map[string]int{}}, nil
}

func (s *Store) nameOptions(ref string) []name.Option {
	host := ref
	if i := strings.IndexByte(ref, '/'); i > 0 {
		host = ref[:i]
	}
	h, _, err := net.SplitHostPort(host)
	if err != nil {
		h = host
	}
	if h == "localhost" || (net.ParseIP(h) != nil && net.ParseIP(h).IsLoopback()) {
		return []name.Option{name.Insecure}
	}
	for _, r := range s.Insecure {
		if r == host {
			return []name.Option{name.Insecure}
		}
	}
	return nil
}

// Get returns the converted image for ref (tag or digest), converting it
// when it is not cached. release must be called when the VM using it is
// gone; until then the image is not evicted.
func (s *Store) Get(ctx context.Context, ref string) (*Image, func(), error) {
	r, err := name.ParseReference(ref, s.nameOptions(ref)...)
	if err != nil {
		return nil, nil, fmt.Errorf("bad image reference %q: %w", ref, err)
	}
	img, err := remote.Image(r, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"}))
	if err != nil {
		return nil, nil, fmt.Errorf("cannot pull %s: %w", ref, err)
	}
	digest, err := img.Digest()
	if err != nil {
		return nil, nil, err
	}
	key := digest.Hex
	v, err, _ := s.sf.Do(key, func() (any, error) {
		if im, err := s.load(key); err == nil {
			return im, nil
		}
		return s.convert(ctx, img, key)
	})
	if err != nil {
		return nil, nil, err
	}
	im := v.(*Image)
	s.mu.Lock()
	s.inUse[key]++
	s.mu.Unlock()
	now := time.Now()
	_ = os.Chtimes(filepath.Join(s.Dir, key), now, now) // LRU clock
	s.evict()
	var once sync.Once
	return im, func() {
		once.Do(func() {
			s.mu.Lock()
			s.inUse[key]--
			if s.inUse[key] <= 0 {
				delete(s.inUse, key)
			}
			s.mu.Unlock()
		})
	}, nil
}

func (s *Store) load(key string) (*Image, error) {
	b, err := os.ReadFile(filepath.Join(s.Dir, key, "image.json"))
	if err != nil {
		return nil, err
	}
	var im Image
	if err := json.Unmarshal(b, &im); err != nil {
		return nil, err
	}
	im.Path = filepath.Join(s.Dir, key, "rootfs.ext4")
	return &im, nil
}

// Convert flattens img into a new ext4 image in the store.
func (s *Store) convert(ctx context.Context, img v1.Image, key string) (*Image, error) {
	tmp, err := os.MkdirTemp(s.Dir, "tmp-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	tree := filepath.Join(tmp, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		return nil, err
	}
	stats, err := Flatten(ctx, img, tree)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("cannot read image config: %w", err)
	}
	cfg := Config{Entrypoint: cf.Config.Entrypoint, Cmd: cf.Config.Cmd, Env: cf.Config.Env, WorkDir: cf.Config.WorkingDir, User: cf.Config.User}
	if cfg.UID, cfg.GID, err = ResolveUser(tree, cf.Config.User); err != nil {
		return nil, err
	}
	if len(cfg.Entrypoint)+len(cfg.Cmd) == 0 {
		return nil, errors.New("image has neither ENTRYPOINT nor CMD")
	}
	ext4 := filepath.Join(tmp, "rootfs.ext4")
	if err := MakeExt4(ctx, tree, ext4, stats); err != nil {
		return nil, err
	}
	fi, err := os.Stat(ext4)
	if err != nil {
		return nil, err
	}
	im := &Image{Digest: "sha256:" + key, Size: fi.Size(), Config: cfg}
	b, _ := json.Marshal(im)
	final := filepath.Join(s.Dir, key)
	if err := os.MkdirAll(final+".new", 0o755); err != nil {
		return nil, err
	}
	if err := os.Rename(ext4, filepath.Join(final+".new", "rootfs.ext4")); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(final+".new", "image.json"), b, 0o644); err != nil {
		return nil, err
	}
	_ = os.RemoveAll(final)
	if err := os.Rename(final+".new", final); err != nil {
		return nil, err
	}
	im.Path = filepath.Join(final, "rootfs.ext4")
	return im, nil
}

// Flatten extracts img's layers, bottom first, into dir.
func Flatten(ctx context.Context, img v1.Image, dir string) (Stats, error) {
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
	for i, l := range layers {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		for pass := range 2 {
			rc, err := l.Uncompressed()
			if err != nil {
				return st, fmt.Errorf("layer %d: %w", i, err)
			}
			tr := tar.NewReader(bufio.NewReaderSize(rc, 1<<20))
			if pass == 0 {
				err = applyWhiteouts(root, tr)
			} else {
				err = extract(root, tr, &st)
			}
			rc.Close()
			if err != nil {
				return st, fmt.Errorf("layer %d: %w", i, err)
			}
		}
	}
	return st, nil
}

// MakeExt4 builds an ext4 image of dir sized to its content plus headroom.
func MakeExt4(ctx context.Context, dir, out string, st Stats) error {
	used, inodes, err := du(dir)
	if err != nil {
		return err
	}
	size := used + used/4 + 64<<20 // content + 25% + 64 MiB of free space for the app
	size = (size + 1<<20 - 1) &^ (1<<20 - 1)
	cmd := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-d", dir, "-N", strconv.FormatInt(inodes*2+4096, 10),
		"-E", "root_owner=0:0", "-O", "^has_journal", "-L", "zeitwork-root", out, strconv.FormatInt(size/1024, 10)+"k")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4: %v: %s", err, strings.TrimSpace(string(b)))
	}
	return nil
}

// du returns the disk space (rounded to 4 KiB blocks) and inode count of dir.
func du(dir string) (bytes, inodes int64, err error) {
	err = filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		inodes++
		bytes += (fi.Size() + 4095) &^ 4095
		if fi.IsDir() {
			bytes += 4096
		}
		return nil
	})
	return bytes, inodes, err
}

// evict removes least recently used images until the store is within
// MaxBytes, skipping images in use.
func (s *Store) evict() {
	if s.MaxBytes <= 0 {
		return
	}
	entries, _ := os.ReadDir(s.Dir)
	type item struct {
		key  string
		size int64
		used time.Time
	}
	var items []item
	var total int64
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), "tmp-") || strings.HasSuffix(e.Name(), ".new") {
			continue
		}
		fi, err := os.Stat(filepath.Join(s.Dir, e.Name(), "rootfs.ext4"))
		if err != nil {
			continue
		}
		di, _ := e.Info()
		items = append(items, item{e.Name(), fi.Size(), di.ModTime()})
		total += fi.Size()
	}
	sort.Slice(items, func(i, j int) bool { return items[i].used.Before(items[j].used) })
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, it := range items {
		if total <= s.MaxBytes {
			return
		}
		if s.inUse[it.key] > 0 {
			continue
		}
		if os.RemoveAll(filepath.Join(s.Dir, it.key)) == nil {
			total -= it.size
		}
	}
}

// ResolveUser maps an image's USER ("name", "uid", "uid:gid", "name:group")
// to numeric ids using the image's /etc/passwd and /etc/group.
func ResolveUser(tree, user string) (uint32, uint32, error) {
	if user == "" {
		return 0, 0, nil
	}
	u, g, hasGroup := strings.Cut(user, ":")
	root, err := os.OpenRoot(tree)
	if err != nil {
		return 0, 0, err
	}
	defer root.Close()
	var uid, gid uint64
	if n, err := strconv.ParseUint(u, 10, 32); err == nil {
		uid = n
		gid = n
		if e := lookup(root, "etc/passwd", func(f []string) bool { return f[2] == u }); e != nil {
			gid, _ = strconv.ParseUint(e[3], 10, 32)
		}
	} else {
		e := lookup(root, "etc/passwd", func(f []string) bool { return f[0] == u })
		if e == nil {
			return 0, 0, fmt.Errorf("image USER %q is not in /etc/passwd", u)
		}
		uid, _ = strconv.ParseUint(e[2], 10, 32)
		gid, _ = strconv.ParseUint(e[3], 10, 32)
	}
	if hasGroup {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil {
			gid = n
		} else {
			e := lookup(root, "etc/group", func(f []string) bool { return f[0] == g })
			if e == nil {
				return 0, 0, fmt.Errorf("image group %q is not in /etc/group", g)
			}
			gid, _ = strconv.ParseUint(e[2], 10, 32)
		}
	}
	return uint32(uid), uint32(gid), nil
}

func lookup(root *os.Root, file string, match func([]string) bool) []string {
	b, err := root.ReadFile(file)
	if err != nil {
		return nil
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ":")
		if len(f) >= 4 && match(f) {
			return f
		}
	}
	return nil
}
