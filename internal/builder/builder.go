// Package builder runs builds from source on a node: each build gets its
// own builder microVM, booted through the same VMM as the apps, from the
// builder root disk (internal/builderimage), with
//
//   - its source tree (a git commit fetched on the host by
//     internal/gitsource, or an uploaded archive) on a read-only drive,
//   - the project's layer-cache disk (an ext4 file per project on this
//     node, reused by the next build of the project),
//   - an output drive the VM writes the image to (a docker-archive),
//   - a tap whose only reachable address is an egress proxy
//     (internal/egress) that tunnels to the allowlisted registries and
//     mirrors, and its own CPU, memory, disk and time limits.
//
// The VM runs `zeitwork-init build` (internal/buildrunner). When it
// succeeds, the host reads the image from the output drive and pushes it
// to the platform registry; the VM holds no credentials. Whatever ends a
// build — success, failure, cancel, deadline — the VM is killed, its tap
// released, the proxy closed and its files removed.
package builder

import (
	"bufio"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/builderimage"
	"github.com/zeitwork/zeitwork/internal/buildrunner"
	"github.com/zeitwork/zeitwork/internal/egress"
	"github.com/zeitwork/zeitwork/internal/guest"
	"github.com/zeitwork/zeitwork/internal/hostnet"
	"github.com/zeitwork/zeitwork/internal/vmm"
)

// Config is the node's build configuration.
type Config struct {
	WorkDir     string // builds/<id> and cache/<project>.ext4 live here
	Concurrency int    // builds at once on this node
	VCPUs       int    // defaults of a spec that leaves them unset
	MemoryMiB   int
	DiskMiB     int
	// Egress are the endpoints builder VMs may reach (registries, package
	// mirrors), besides the registry a build pushes to.
	Egress   []egress.Endpoint
	Insecure []string // registries spoken to over plain HTTP (loopback ones always are)
	MaxLog   int      // log lines kept per build
}

// Deps are what the builder uses from the node agent.
type Deps struct {
	VMM    vmm.VMM
	Net    *hostnet.Manager
	Kernel string
	Initrd string
	// RootDisk returns the builder root disk (builderimage.Ensure), made
	// on the first build.
	RootDisk func(ctx context.Context) (string, error)
	// Source writes the tar of a build's source to w.
	Source func(ctx context.Context, src build.Source, w io.Writer) error
	Log    *slog.Logger
}

// Builder runs the node's builds.
type Builder struct {
	cfg   Config
	deps  Deps
	log   *slog.Logger
	slots chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	builds map[string]*job
}

// New prepares the work directories and removes what builds interrupted
// by an agent restart left behind (VMs, taps, files): builds are not
// resumed, the operator sees them gone and fails them.
func New(cfg Config, deps Deps) (*Builder, error) {
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 1
	}
	if cfg.MaxLog <= 0 {
		cfg.MaxLog = 20000
	}
	for _, d := range []string{"builds", "cache"} {
		if err := os.MkdirAll(filepath.Join(cfg.WorkDir, d), 0o755); err != nil {
			return nil, fmt.Errorf("cannot create build directory: %w", err)
		}
	}
	b := &Builder{cfg: cfg, deps: deps, log: deps.Log, slots: make(chan struct{}, cfg.Concurrency), builds: map[string]*job{}}
	b.ctx, b.cancel = context.WithCancel(context.Background())
	left, _ := os.ReadDir(filepath.Join(cfg.WorkDir, "builds"))
	for _, e := range left {
		dir := filepath.Join(cfg.WorkDir, "builds", e.Name())
		if m, err := deps.VMM.Adopt(b.ctx, filepath.Join(dir, "vm")); err == nil {
			_ = m.Kill()
		}
		_ = deps.Net.Release(vmID(e.Name()))
		_ = os.RemoveAll(dir)
		b.log.Warn("removed a build interrupted by an agent restart", "build_id", e.Name())
	}
	return b, nil
}

// Close cancels every build and waits until each has cleaned up.
func (b *Builder) Close() {
	b.cancel()
	b.wg.Wait()
}

// Capacity is the number of builds the node runs at once.
func (b *Builder) Capacity() int { return b.cfg.Concurrency }

// ErrNotFound and ErrConflict classify API errors.
var (
	ErrNotFound = errors.New("no such build")
	ErrConflict = errors.New("conflict")
)

// Start accepts a build; it is idempotent on the spec's id.
func (b *Builder) Start(spec build.Spec) (build.Status, error) {
	if err := spec.Validate(); err != nil {
		return build.Status{}, err
	}
	if spec.VCPUs == 0 {
		spec.VCPUs = b.cfg.VCPUs
	}
	if spec.MemoryMiB == 0 {
		spec.MemoryMiB = b.cfg.MemoryMiB
	}
	if spec.DiskMiB == 0 {
		spec.DiskMiB = b.cfg.DiskMiB
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if j, ok := b.builds[spec.ID]; ok {
		return j.status(), nil
	}
	if b.ctx.Err() != nil {
		return build.Status{}, fmt.Errorf("%w: the node agent is shutting down", ErrConflict)
	}
	j := &job{spec: spec, st: build.Status{ID: spec.ID, DeploymentID: spec.DeploymentID, State: build.StateQueued, CreatedAt: time.Now().UTC()},
		max: b.cfg.MaxLog, changed: make(chan struct{}), done: make(chan struct{})}
	j.ctx, j.cancel = context.WithTimeout(b.ctx, time.Duration(spec.TimeoutS)*time.Second)
	b.builds[spec.ID] = j
	b.wg.Go(func() { b.run(j) })
	return j.status(), nil
}

// Get returns one build's status.
func (b *Builder) Get(id string) (build.Status, error) {
	j, err := b.job(id)
	if err != nil {
		return build.Status{}, err
	}
	return j.status(), nil
}

// List returns every build the node holds, oldest first.
func (b *Builder) List() []build.Status {
	b.mu.Lock()
	out := make([]build.Status, 0, len(b.builds))
	for _, j := range b.builds {
		out = append(out, j.status())
	}
	b.mu.Unlock()
	sort.Slice(out, func(i, k int) bool { return out[i].CreatedAt.Before(out[k].CreatedAt) })
	return out
}

// Cancel stops a build; a finished build stays as it ended.
func (b *Builder) Cancel(id string) (build.Status, error) {
	j, err := b.job(id)
	if err != nil {
		return build.Status{}, err
	}
	j.mu.Lock()
	j.canceled = true
	j.mu.Unlock()
	j.cancel()
	return j.status(), nil
}

// Delete forgets a build (canceling it first and waiting for its
// cleanup): the operator calls it once it has stored the result and log.
func (b *Builder) Delete(id string) error {
	j, err := b.job(id)
	if err != nil {
		return err
	}
	j.mu.Lock()
	j.canceled = true
	j.mu.Unlock()
	j.cancel()
	<-j.done
	b.mu.Lock()
	delete(b.builds, id)
	b.mu.Unlock()
	return nil
}

// Logs returns the lines from seq since on, a channel closed at the next
// change, and whether the build has ended (no lines will follow).
func (b *Builder) Logs(id string, since int) ([]build.LogLine, <-chan struct{}, bool, error) {
	j, err := b.job(id)
	if err != nil {
		return nil, nil, false, err
	}
	lines, ch, done := j.logsSince(since)
	return lines, ch, done, nil
}

func (b *Builder) job(id string) (*job, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	j, ok := b.builds[id]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return j, nil
}

// job is one build: its spec, status and log.
type job struct {
	spec   build.Spec
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	st       build.Status
	lines    []build.LogLine
	dropped  int
	tail     []string // the builder's last lines, for the error
	max      int
	changed  chan struct{}
	canceled bool
	done     chan struct{} // closed when run has returned (cleanup included)
}

func (j *job) status() build.Status {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.st
}

func (j *job) update(f func(*build.Status)) {
	j.mu.Lock()
	f(&j.st)
	close(j.changed)
	j.changed = make(chan struct{})
	j.mu.Unlock()
}

// logf adds one of the platform's own lines.
func (j *job) logf(format string, args ...any) { j.append("zeitwork", fmt.Sprintf(format, args...)) }

func (j *job) append(stream, line string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if stream == "build" {
		switch {
		case stepRE.MatchString(line):
			j.st.Steps++
		case strings.HasPrefix(line, "--> Using cache "):
			j.st.CacheHits++
		}
		j.tail = append(j.tail, line)
		if len(j.tail) > 15 {
			j.tail = j.tail[len(j.tail)-15:]
		}
	}
	if len(j.lines) >= j.max {
		j.dropped++
		return
	}
	j.lines = append(j.lines, build.LogLine{Seq: len(j.lines) + 1, Time: time.Now().UTC(), Stream: stream, Line: line})
	close(j.changed)
	j.changed = make(chan struct{})
}

func (j *job) logsSince(since int) ([]build.LogLine, <-chan struct{}, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if since < 0 {
		since = 0
	}
	var out []build.LogLine
	if since < len(j.lines) {
		out = append(out, j.lines[since:]...)
	}
	return out, j.changed, build.Terminal(j.st.State)
}

func (j *job) tailText() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return strings.Join(j.tail, "\n")
}

// stepRE matches buildah's step lines: "STEP 2/6: …", "[1/2] STEP 2/6: …".
var stepRE = regexp.MustCompile(`^(\[\d+/\d+\] )?STEP \d+/\d+: `)

// vmID is the VM (and network lease) name of a build.
func vmID(buildID string) string { return "b-" + buildID }

// run owns one build from queue to cleanup.
func (b *Builder) run(j *job) {
	defer close(j.done)
	defer j.cancel()
	select {
	case b.slots <- struct{}{}:
	case <-j.ctx.Done():
		b.finish(j, nil, j.ctx.Err())
		return
	}
	defer func() { <-b.slots }()
	now := time.Now().UTC()
	j.update(func(s *build.Status) { s.State = build.StateRunning; s.StartedAt = &now })
	image, err := b.execute(j)
	b.finish(j, image, err)
}

func (b *Builder) finish(j *job, image *string, err error) {
	now := time.Now().UTC()
	j.mu.Lock()
	canceled := j.canceled
	j.mu.Unlock()
	deadline := errors.Is(j.ctx.Err(), context.DeadlineExceeded)
	switch {
	case err == nil && image != nil:
		j.logf("pushed %s", *image)
		j.update(func(s *build.Status) { s.State = build.StateSucceeded; s.Image = *image; s.FinishedAt = &now })
	case canceled:
		j.logf("build canceled")
		j.update(func(s *build.Status) { s.State = build.StateCanceled; s.Error = "canceled"; s.FinishedAt = &now })
	default:
		msg := err.Error()
		if deadline {
			msg = fmt.Sprintf("the build exceeded its time limit of %s and was stopped", time.Duration(j.spec.TimeoutS)*time.Second)
		}
		j.logf("build failed: %s", msg)
		if t := j.tailText(); t != "" {
			msg += "\nlast lines of the build:\n" + t
		}
		j.update(func(s *build.Status) { s.State = build.StateFailed; s.Error = msg; s.FinishedAt = &now })
	}
	st := j.status()
	b.log.Info("build finished", "build_id", st.ID, "deployment_id", st.DeploymentID, "state", st.State,
		"steps", st.Steps, "cache_hits", st.CacheHits)
}

// execute fetches the source, boots the builder VM, waits for it and
// pushes the image. Everything it creates is gone when it returns.
func (b *Builder) execute(j *job) (*string, error) {
	ctx := j.ctx
	spec := j.spec
	dir := filepath.Join(b.cfg.WorkDir, "builds", spec.ID)
	if err := os.MkdirAll(filepath.Join(dir, "vm"), 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)

	// Source.
	j.logf("fetching source %s", describe(spec.Source))
	srcPath := filepath.Join(dir, "source.tar")
	if err := b.writeSource(ctx, spec.Source, srcPath); err != nil {
		return nil, fmt.Errorf("cannot fetch the source: %w", err)
	}

	// Layer cache: the project's disk, unless another build of the
	// project holds it (then a throwaway one).
	cachePath, release, err := b.cacheDisk(ctx, j, dir)
	if err != nil {
		return nil, err
	}
	defer release()
	outPath := filepath.Join(dir, "output.img")
	if err := sparseFile(outPath, int64(spec.DiskMiB)<<20); err != nil {
		return nil, err
	}

	// Network: a tap whose only way out is the egress proxy.
	id := vmID(spec.ID)
	lease, err := b.deps.Net.Allocate(id, 0)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err := b.deps.Net.Release(id); err != nil {
			b.log.Warn("cannot release builder network", "build_id", spec.ID, "err", err)
		}
	}()
	allow, insecure := b.egressFor(spec.Image)
	proxy, err := egress.Listen(net.JoinHostPort(lease.HostIP, "0"), allow, b.log.With("build_id", spec.ID))
	if err != nil {
		return nil, err
	}
	defer proxy.Close()
	if err := b.deps.Net.AllowEgress(id, proxy.Addr().Port); err != nil {
		return nil, err
	}
	routes, hosts := egress.Routes(allow)
	rjob := buildrunner.Job{Dockerfile: spec.Dockerfile, Context: spec.Context, BuildArgs: spec.BuildArgs, Tag: localTag,
		Proxy: proxy.Addr().String(), Routes: routes, Hosts: hosts, Insecure: insecure, MemoryMiB: spec.MemoryMiB, DiskMiB: spec.DiskMiB}
	jb, _ := json.Marshal(rjob)

	// The builder VM.
	disk, err := b.deps.RootDisk(ctx)
	if err != nil {
		return nil, fmt.Errorf("cannot prepare the builder image: %w", err)
	}
	j.logf("starting builder VM (%d vCPU, %d MiB memory, %d MiB disk, time limit %s)", spec.VCPUs, spec.MemoryMiB, spec.DiskMiB,
		time.Duration(spec.TimeoutS)*time.Second)
	m, err := b.deps.VMM.Start(ctx, vmm.Spec{
		ID: id, VCPUs: spec.VCPUs, MemoryMiB: spec.MemoryMiB, Kernel: b.deps.Kernel, Initrd: b.deps.Initrd,
		RootDisk: disk, Tap: lease.Tap, MAC: lease.MAC, Dir: filepath.Join(dir, "vm"),
		Drives: []vmm.Drive{
			{ID: buildrunner.DriveCache, Path: cachePath},
			{ID: buildrunner.DriveSource, Path: srcPath, ReadOnly: true},
			{ID: buildrunner.DriveOutput, Path: outPath},
		},
	})
	if err != nil {
		return nil, fmt.Errorf("cannot start the builder VM: %w", err)
	}
	defer func() {
		_ = m.Kill()
		<-m.Done()
	}()
	cfg := &guest.Config{
		Entrypoint: []string{builderimage.InitPath, "build"}, Hostname: "builder",
		Env:     []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", buildrunner.EnvJob + "=" + string(jb)},
		Address: lease.GuestCIDR(), Gateway: lease.HostIP, MTU: 1500, StopGraceMS: 2000,
	}
	code, err := b.converse(ctx, j, m, cfg)
	if err != nil {
		return nil, err
	}
	switch code {
	case 0:
	case buildrunner.ExitCache:
		_ = os.Remove(cachePath)
		return nil, errors.New("the layer cache disk was unusable and has been reset; deploy again")
	case buildrunner.ExitNoSpace:
		_ = os.Remove(cachePath) // a full cache helps no later build
		return nil, fmt.Errorf("the build filled its disk (%d MiB)", spec.DiskMiB)
	case buildrunner.ExitOOM:
		return nil, fmt.Errorf("the build ran out of memory (%d MiB)", spec.MemoryMiB)
	case buildrunner.ExitDockerfile:
		return nil, fmt.Errorf("no Dockerfile at %s in the source", strings.TrimPrefix(spec.Context+"/"+spec.Dockerfile, "./"))
	default:
		return nil, fmt.Errorf("the Dockerfile build failed (exit code %d)", code)
	}
	j.logf("pushing %s", spec.Image)
	reg := spec.Image[:strings.Index(spec.Image, "/")]
	ref, err := Push(ctx, outPath, spec.Image, slices.Contains(insecure, reg))
	if err != nil {
		return nil, fmt.Errorf("cannot push the image: %w", err)
	}
	return &ref, nil
}

// converse sends the build job to init and streams the log until the VM
// reports its exit code or stops.
func (b *Builder) converse(ctx context.Context, j *job, m vmm.Machine, cfg *guest.Config) (int, error) {
	conn, err := guest.Dial(ctx, m.DialAgent)
	if err != nil {
		return 0, ctx.Err()
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = m.Kill() })
	defer stop()
	go func() { <-m.Done(); conn.Close() }() // ends when the VM does (converse's caller kills it)
	r, w := guest.NewReader(conn), guest.NewWriter(conn)
	for {
		f, err := r.Next()
		if errors.Is(err, guest.ErrBadFrame) {
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			return 0, errors.New("the builder VM stopped without reporting a result")
		}
		switch f.Type {
		case guest.TypeReady:
			if err := w.Send(&guest.Frame{Type: guest.TypeConfig, Config: cfg}); err != nil {
				return 0, err
			}
		case guest.TypeLog:
			stream := "build"
			if f.Stream == "init" || strings.HasPrefix(f.Line, "zeitwork: ") {
				stream = "zeitwork"
			}
			j.append(stream, strings.TrimPrefix(f.Line, "zeitwork: "))
		case guest.TypeExit:
			if f.Code == nil {
				return 0, errors.New("the builder VM reported no exit code")
			}
			if f.Error != "" && *f.Code != 0 {
				j.logf("%s", f.Error)
			}
			return *f.Code, nil
		}
	}
}

func describe(s build.Source) string {
	if s.GitURL != "" {
		return s.GitURL + " at " + s.CommitSHA
	}
	return "(uploaded archive)"
}

// localTag names the image inside the VM: one name per project cache
// (each build's image takes it over), independent of the registry.
const localTag = "localhost/zeitwork-build:latest"

// writeSource stores the source tar at path, padded to whole sectors.
func (b *Builder) writeSource(ctx context.Context, src build.Source, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := b.deps.Source(ctx, src, f); err != nil {
		return err
	}
	// Two zero blocks end a tar; a few more make the drive whole sectors.
	if _, err := f.Write(make([]byte, 4096)); err != nil {
		return err
	}
	return f.Close()
}

// cacheDisk returns the layer-cache disk for the build and a release
// function. The project's disk is locked for the build; when it is
// taken, the build gets a fresh disk in its own directory.
func (b *Builder) cacheDisk(ctx context.Context, j *job, dir string) (string, func(), error) {
	path := filepath.Join(b.cfg.WorkDir, "cache", safeName(j.spec.ProjectID)+".ext4")
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		j.logf("the project's layer cache is in use by another build; building without it")
		path = filepath.Join(dir, "cache.ext4")
		return path, func() {}, newCacheDisk(ctx, path, j.spec.DiskMiB)
	}
	release := func() { _ = unix.Flock(int(lock.Fd()), unix.LOCK_UN); lock.Close() }
	st, err := os.Stat(path)
	switch {
	case err == nil && st.Size() == int64(j.spec.DiskMiB)<<20:
		j.logf("using the project's layer cache")
	default:
		if err == nil {
			j.logf("the disk limit changed; the layer cache starts empty")
		} else {
			j.logf("first build of this project on this node: the layer cache starts empty")
		}
		if err := newCacheDisk(ctx, path, j.spec.DiskMiB); err != nil {
			release()
			return "", nil, err
		}
	}
	return path, release, nil
}

func newCacheDisk(ctx context.Context, path string, mib int) error {
	_ = os.Remove(path)
	if err := sparseFile(path+".part", int64(mib)<<20); err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-m", "0", "-L", "zw-cache", "-E", "root_owner=0:0", path+".part").CombinedOutput()
	if err != nil {
		_ = os.Remove(path + ".part")
		return fmt.Errorf("cannot create the layer cache disk: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return os.Rename(path+".part", path)
}

func sparseFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func safeName(s string) string {
	var b strings.Builder
	for _, c := range s {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' {
			b.WriteRune(c)
		}
	}
	if b.Len() == 0 {
		return "default"
	}
	return b.String()
}

// egressFor is the allowlist of a build that pushes to image: the
// configured endpoints plus its registry, and which of them speak plain
// HTTP.
func (b *Builder) egressFor(image string) ([]egress.Endpoint, []string) {
	allow := append([]egress.Endpoint{}, b.cfg.Egress...)
	var insecure []string
	reg := image[:strings.Index(image, "/")]
	if e, err := egress.ParseEndpoint(reg); err == nil {
		allow = append(allow, e)
	} else if e, err := egress.ParseEndpoint(reg + ":443"); err == nil {
		allow = append(allow, e)
	}
	seen := map[string]bool{}
	var uniq []egress.Endpoint
	for _, e := range allow {
		if !seen[e.String()] {
			seen[e.String()] = true
			uniq = append(uniq, e)
			if b.insecure(e.String()) {
				insecure = append(insecure, e.String())
			}
		}
	}
	return uniq, insecure
}

func (b *Builder) insecure(hostport string) bool {
	host, _, _ := net.SplitHostPort(hostport)
	if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
		return true
	}
	for _, r := range b.cfg.Insecure {
		if r == hostport {
			return true
		}
	}
	return false
}

// Push reads the docker-archive a build wrote to archive (a file, or the
// output drive) and pushes it to image (over plain HTTP when insecure).
// It returns the pushed reference by digest.
func Push(ctx context.Context, archive, image string, insecure bool) (string, error) {
	var opts []name.Option
	if insecure {
		opts = append(opts, name.Insecure)
	}
	ref, err := name.NewTag(image, opts...)
	if err != nil {
		return "", err
	}
	opener := func() (io.ReadCloser, error) { return os.Open(archive) }
	img, err := tarball.Image(opener, nil)
	if err != nil {
		return "", fmt.Errorf("the builder produced no readable image: %w", err)
	}
	if err := checkImage(img); err != nil {
		return "", err
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
		return "", err
	}
	d, err := img.Digest()
	if err != nil {
		return "", err
	}
	return ref.Context().Digest(d.String()).String(), nil
}

// checkImage bounds what the host accepts from the VM.
func checkImage(img v1.Image) error {
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("the built image has no readable config: %w", err)
	}
	if cf.OS != "" && cf.OS != "linux" {
		return fmt.Errorf("the built image is for %s, not linux", cf.OS)
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	if len(layers) > 127 {
		return fmt.Errorf("the built image has %d layers (at most 127)", len(layers))
	}
	return nil
}

// GunzipTo copies a gzipped stream (an uploaded source archive) to w,
// bounded by max bytes once decompressed.
func GunzipTo(w io.Writer, r io.Reader, max int64) error {
	zr, err := gzip.NewReader(bufio.NewReader(r))
	if err != nil {
		return fmt.Errorf("the source archive is not gzip: %w", err)
	}
	n, err := io.Copy(w, io.LimitReader(zr, max+1))
	if err != nil {
		return fmt.Errorf("cannot read the source archive: %w", err)
	}
	if n > max {
		return fmt.Errorf("the source archive is larger than %s unpacked", strconv.FormatInt(max>>20, 10)+" MiB")
	}
	return nil
}
