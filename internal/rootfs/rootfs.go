// Package rootfs turns OCI images into the ext4 root disks microVMs boot.
// It pulls an image (go-containerregistry; linux/amd64 from an index; auth
// from the default keychain; plain HTTP only for loopback and configured
// registries), flattens its layers in order — whiteouts, opaque
// directories, hard links, symlinks, device nodes, modes, ownership and
// xattrs — writing only through an os.Root so no entry can escape, and
// builds an ext4 image with `mkfs.ext4 -d`. Images are cached by manifest
// digest, built atomically (temp dir + rename), once for concurrent
// requests, and evicted least-recently-used beyond a size bound, never
// while a VM uses them. Each VM boots a copy-on-write overlay of the image
// (the VMM's job); the image itself is never written after it is built.
package rootfs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/singleflight"

	"github.com/zeitwork/zeitwork/internal/fsutil"
)

// Image is a converted image.
type Image struct {
	// Digest is the image manifest digest ("sha256:…"), the cache key.
	Digest string `json:"digest"`
	// Ref pins the image by digest ("registry/repo@sha256:…"); getting it
	// again is served from the cache without the registry.
	Ref    string `json:"ref"`
	Path   string `json:"path"` // the ext4 file
	Size   int64  `json:"size"`
	Config Config `json:"config"`
	Stats  Stats  `json:"stats"`
}

// Config is what the VM's init needs from the image config.
type Config struct {
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	Env        []string `json:"env,omitempty"`
	WorkDir    string   `json:"workdir,omitempty"`
	User       string   `json:"user,omitempty"` // as written in the image
	UID        uint32   `json:"uid"`
	GID        uint32   `json:"gid"`
	Groups     []uint32 `json:"groups,omitempty"`
	Home       string   `json:"home,omitempty"`
	Ports      []int    `json:"ports,omitempty"` // EXPOSEd TCP ports
}

// Settings configures a Store.
type Settings struct {
	Dir string
	// MaxBytes bounds the cache; least recently used images not in use are
	// evicted beyond it (0 = unbounded).
	MaxBytes int64
	// MaxImageBytes bounds the file content of one image (0 = unbounded).
	MaxImageBytes int64
	// Headroom is the free space left in each ext4 image for the app's
	// writes (default 64 MiB).
	Headroom int64
	// Insecure lists registries ("host:port") reached over plain HTTP;
	// loopback registries always are.
	Insecure []string
	// Keychain resolves registry credentials (default authn.DefaultKeychain).
	Keychain authn.Keychain
	// Timeout bounds one pull and conversion (default 30 min).
	Timeout time.Duration
	Log     *slog.Logger
}

// Store is the on-disk cache of converted images.
type Store struct {
	cfg Settings
	sf  singleflight.Group
	wg  sync.WaitGroup // conversions in flight

	mu    sync.Mutex // guards inUse and eviction
	inUse map[string]int
}

// New opens (creating) a cache and removes leftovers of conversions that
// were interrupted.
func New(cfg Settings) (*Store, error) {
	if cfg.Dir == "" {
		return nil, errors.New("rootfs: no cache directory")
	}
	if cfg.Headroom <= 0 {
		cfg.Headroom = 64 << 20
	}
	if cfg.Keychain == nil {
		cfg.Keychain = authn.DefaultKeychain
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	for _, d := range []string{cfg.Dir, filepath.Join(cfg.Dir, "refs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("cannot create image cache: %w", err)
		}
	}
	entries, _ := os.ReadDir(cfg.Dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "tmp-") {
			_ = os.RemoveAll(filepath.Join(cfg.Dir, e.Name()))
		}
	}
	return &Store{cfg: cfg, inUse: map[string]int{}}, nil
}

// Close waits for conversions still running for callers that gave up.
func (s *Store) Close() { s.wg.Wait() }

// Insecure reports whether the registry of ref is reached over plain HTTP.
func (s *Store) insecure(registry string) bool {
	h, _, err := net.SplitHostPort(registry)
	if err != nil {
		h = registry
	}
	if h == "localhost" {
		return true
	}
	if ip := net.ParseIP(h); ip != nil && ip.IsLoopback() {
		return true
	}
	return slices.Contains(s.cfg.Insecure, registry)
}

// ParseReference parses an image reference, allowing plain HTTP for
// loopback and configured registries.
func (s *Store) ParseReference(ref string) (name.Reference, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("bad image reference %q: %w", ref, err)
	}
	if s.insecure(r.Context().RegistryStr()) {
		r, err = name.ParseReference(ref, name.Insecure)
	}
	return r, err
}

// Get returns the converted image for ref (by tag or digest), pulling and
// converting it when it is not cached. A reference by digest that was
// converted before is served without the registry. release must be called
// when the VM using the image is gone; until then it is not evicted.
func (s *Store) Get(ctx context.Context, ref string) (*Image, func(), error) {
	r, err := s.ParseReference(ref)
	if err != nil {
		return nil, nil, err
	}
	refKey := refFile(r.String())
	if _, byDigest := r.(name.Digest); byDigest {
		if key, err := os.ReadFile(filepath.Join(s.cfg.Dir, "refs", refKey)); err == nil {
			if im, release, err := s.acquire(string(key)); err == nil {
				return im, release, nil
			}
		}
	}
	img, err := remote.Image(r, remote.WithContext(ctx), remote.WithAuthFromKeychain(s.cfg.Keychain),
		remote.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"}))
	if err != nil {
		return nil, nil, fmt.Errorf("cannot pull %s: %w", ref, err)
	}
	digest, err := img.Digest()
	if err != nil {
		return nil, nil, fmt.Errorf("cannot pull %s: %w", ref, err)
	}
	key := digest.Hex
	pinned := r.Context().Digest(digest.String()).String()
	for attempt := 0; ; attempt++ {
		if im, release, err := s.acquire(key); err == nil {
			s.remember(r, refKey, pinned, key)
			return im, release, nil
		}
		if attempt == 2 {
			return nil, nil, fmt.Errorf("cannot convert %s: evicted while being converted", ref)
		}
		ch := s.sf.DoChan(key, func() (any, error) {
			// The conversion outlives a caller that gives up: others may be
			// waiting for it, and the result is cached.
			s.wg.Add(1)
			defer s.wg.Done()
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.Timeout)
			defer cancel()
			if _, err := s.load(key); err == nil {
				return nil, nil
			}
			return nil, s.convert(cctx, img, key, pinned)
		})
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case res := <-ch:
			if res.Err != nil {
				return nil, nil, fmt.Errorf("cannot convert %s: %w", ref, res.Err)
			}
		}
	}
}

// remember records that a digest reference names key, so the next Get of
// it needs no registry. Tags move and are always resolved.
func (s *Store) remember(r name.Reference, refKey, pinned, key string) {
	_ = fsutil.WriteFile(filepath.Join(s.cfg.Dir, "refs", refFile(pinned)), []byte(key), 0o644)
	if _, ok := r.(name.Digest); ok {
		_ = fsutil.WriteFile(filepath.Join(s.cfg.Dir, "refs", refKey), []byte(key), 0o644)
	}
}

func refFile(ref string) string {
	h := sha256.Sum256([]byte(ref))
	return hex.EncodeToString(h[:16])
}

// acquire marks a cached image in use and returns it, refreshing its LRU
// clock and evicting others if the cache is over its bound.
func (s *Store) acquire(key string) (*Image, func(), error) {
	s.mu.Lock()
	im, err := s.load(key)
	if err != nil {
		s.mu.Unlock()
		return nil, nil, err
	}
	s.inUse[key]++
	now := time.Now()
	_ = os.Chtimes(filepath.Join(s.cfg.Dir, key), now, now)
	s.evictLocked()
	s.mu.Unlock()
	var once sync.Once
	return im, func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.inUse[key]--; s.inUse[key] <= 0 {
				delete(s.inUse, key)
			}
		})
	}, nil
}

func (s *Store) load(key string) (*Image, error) {
	dir := filepath.Join(s.cfg.Dir, key)
	b, err := os.ReadFile(filepath.Join(dir, "image.json"))
	if err != nil {
		return nil, err
	}
	var im Image
	if err := json.Unmarshal(b, &im); err != nil {
		return nil, err
	}
	im.Path = filepath.Join(dir, "rootfs.ext4")
	if _, err := os.Stat(im.Path); err != nil {
		return nil, err
	}
	return &im, nil
}

// convert flattens img into a new ext4 image in the store. The result
// appears atomically: a reader sees the complete directory or nothing.
func (s *Store) convert(ctx context.Context, img v1.Image, key, pinned string) error {
	start := time.Now()
	tmp, err := os.MkdirTemp(s.cfg.Dir, "tmp-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	tree := filepath.Join(tmp, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("cannot read image config: %w", err)
	}
	if cf.OS != "" && cf.OS != "linux" || cf.Architecture != "" && cf.Architecture != "amd64" {
		return fmt.Errorf("image is %s/%s, not linux/amd64", cf.OS, cf.Architecture)
	}
	stats, err := Flatten(ctx, img, tree, s.cfg.MaxImageBytes)
	if err != nil {
		return err
	}
	cfg := Config{Entrypoint: cf.Config.Entrypoint, Cmd: cf.Config.Cmd, Env: cf.Config.Env,
		WorkDir: cf.Config.WorkingDir, User: cf.Config.User}
	if len(cfg.Entrypoint)+len(cfg.Cmd) == 0 {
		return errors.New("image has neither ENTRYPOINT nor CMD")
	}
	u, err := ResolveUser(tree, cf.Config.User)
	if err != nil {
		return err
	}
	cfg.UID, cfg.GID, cfg.Groups, cfg.Home = u.UID, u.GID, u.Groups, u.Home
	for p := range cf.Config.ExposedPorts {
		num, proto, _ := strings.Cut(p, "/")
		if n, err := strconv.Atoi(num); err == nil && (proto == "" || proto == "tcp") {
			cfg.Ports = append(cfg.Ports, n)
		}
	}
	sort.Ints(cfg.Ports)
	if err := prepareTree(tree, cfg.WorkDir); err != nil {
		return err
	}
	ext4 := filepath.Join(tmp, "rootfs.ext4")
	if err := MakeExt4(ctx, tree, ext4, s.cfg.Headroom); err != nil {
		return err
	}
	fi, err := os.Stat(ext4)
	if err != nil {
		return err
	}
	im := &Image{Digest: "sha256:" + key, Ref: pinned, Size: fi.Size(), Config: cfg, Stats: stats}
	b, err := json.Marshal(im)
	if err != nil {
		return err
	}
	out := filepath.Join(tmp, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return err
	}
	if err := os.Rename(ext4, filepath.Join(out, "rootfs.ext4")); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, "image.json"), b, 0o644); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	final := filepath.Join(s.cfg.Dir, key)
	if s.inUse[key] == 0 {
		_ = os.RemoveAll(final) // a partial directory from an older layout
	}
	if err := os.Rename(out, final); err != nil {
		if _, lerr := s.load(key); lerr == nil {
			return nil // another process converted it meanwhile
		}
		return fmt.Errorf("cannot store image: %w", err)
	}
	s.cfg.Log.Info("image converted", "digest", im.Digest, "files", stats.Files, "bytes", stats.Bytes,
		"ext4_bytes", im.Size, "duration", time.Since(start).Round(time.Millisecond).String())
	return nil
}

// prepareTree adds what every microVM root needs and the image may lack:
// mount points for init and the image's working directory.
func prepareTree(tree, workdir string) error {
	root, err := os.OpenRoot(tree)
	if err != nil {
		return err
	}
	defer root.Close()
	for _, d := range []string{"proc", "sys", "dev", "tmp", "run", "etc"} {
		if _, err := root.Lstat(d); err == nil {
			continue
		}
		mode := os.FileMode(0o755)
		if d == "tmp" {
			mode = 0o777 | os.ModeSticky
		}
		if err := root.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("cannot create /%s: %w", d, err)
		}
		if err := root.Chmod(d, mode); err != nil {
			return err
		}
	}
	if w := CleanName(workdir); w != "" {
		x := &extractor{root: root}
		p, err := x.resolve(w)
		if err == nil {
			_ = root.MkdirAll(p, 0o755) // Docker creates a missing WORKDIR
		}
	}
	return nil
}

// CacheStats describes the cache, for metrics and /node/resources.
type CacheStats struct {
	Images int   `json:"images"`
	Bytes  int64 `json:"bytes"`
	InUse  int   `json:"in_use"`
}

// Usage reports what the cache holds.
func (s *Store) Usage() CacheStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	var st CacheStats
	for _, it := range s.items() {
		st.Images++
		st.Bytes += it.size
	}
	st.InUse = len(s.inUse)
	return st
}

type cacheItem struct {
	key  string
	size int64
	used time.Time
}

func (s *Store) items() []cacheItem {
	entries, _ := os.ReadDir(s.cfg.Dir)
	var items []cacheItem
	for _, e := range entries {
		if !e.IsDir() || len(e.Name()) != 64 {
			continue
		}
		fi, err := os.Stat(filepath.Join(s.cfg.Dir, e.Name(), "rootfs.ext4"))
		if err != nil {
			continue
		}
		di, err := e.Info()
		if err != nil {
			continue
		}
		items = append(items, cacheItem{e.Name(), fi.Size(), di.ModTime()})
	}
	return items
}

// evictLocked removes least recently used images until the cache is
// within MaxBytes, skipping images in use. s.mu is held.
func (s *Store) evictLocked() {
	if s.cfg.MaxBytes <= 0 {
		return
	}
	items := s.items()
	var total int64
	for _, it := range items {
		total += it.size
	}
	sort.Slice(items, func(i, j int) bool { return items[i].used.Before(items[j].used) })
	for _, it := range items {
		if total <= s.cfg.MaxBytes {
			return
		}
		if s.inUse[it.key] > 0 {
			continue
		}
		// Rename first so a concurrent reader never sees half a directory.
		doomed := filepath.Join(s.cfg.Dir, "tmp-evict-"+it.key)
		if os.Rename(filepath.Join(s.cfg.Dir, it.key), doomed) == nil {
			_ = os.RemoveAll(doomed)
			total -= it.size
			s.cfg.Log.Info("image evicted", "digest", "sha256:"+it.key, "bytes", it.size)
		}
	}
}
