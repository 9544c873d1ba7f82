// Package buildrunner runs one build inside a builder microVM: it is
// `zeitwork-init build`, started by zeitwork-init (PID 1) as the VM's
// workload, as root in the builder root disk (Debian's buildah, see
// internal/builderimage). It mounts the project's layer-cache disk,
// unpacks the source tree from its drive, opens the egress forwarders
// (internal/egress), runs `buildah build` with the project's Dockerfile,
// and writes the result as a docker-archive to the output drive, which
// the node agent reads and pushes to the registry: the VM holds no
// registry credentials, and the host never runs the Dockerfile.
//
// Its stdout and stderr are the build log (init forwards them line by
// line); its exit code is the result.
package buildrunner

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zeitwork/zeitwork/internal/egress"
)

// EnvJob is the environment variable that carries the job (JSON).
const EnvJob = "ZEITWORK_BUILD"

// Drive serials (QEMU) and, in this order after the root disk, the device
// order (Firecracker): vdb, vdc, vdd.
const (
	DriveCache  = "zw-cache"
	DriveSource = "zw-source"
	DriveOutput = "zw-output"
)

// Exit codes that name a cause.
const (
	ExitFailed     = 1 // the Dockerfile failed (buildah's own message says why)
	ExitSetup      = 2 // the VM could not be prepared
	ExitCache      = 3 // the layer-cache disk cannot be mounted: the host resets it
	ExitNoSpace    = 4 // the build filled its disk
	ExitOOM        = 5 // the build ran out of memory
	ExitDockerfile = 6 // no Dockerfile at the given path
)

// Job is what the node agent asks for.
type Job struct {
	Dockerfile string            `json:"dockerfile"`
	Context    string            `json:"context"`
	BuildArgs  map[string]string `json:"build_args,omitempty"`
	Tag        string            `json:"tag"`
	Proxy      string            `json:"proxy"` // host:port of the egress proxy
	Routes     []egress.Route    `json:"routes,omitempty"`
	Hosts      string            `json:"hosts,omitempty"` // /etc/hosts lines for the routes' names
	Insecure   []string          `json:"insecure,omitempty"`
	MemoryMiB  int               `json:"memory_mib"`
	DiskMiB    int               `json:"disk_mib"`
}

// Paths are where the runner works: in the VM, mount points and devices.
type Paths struct {
	Storage string // buildah's graph root (on the cache disk)
	RunRoot string
	Tmp     string // buildah's temporary files and RUN --mount=type=cache directories (on the cache disk)
	Config  string // directory of the registries.conf written for the build
	Source  string // the unpacked source tree
	Output  string // where the docker-archive is written
}

// Main is `zeitwork-init build`: it returns the exit code.
func Main() int {
	var job Job
	if err := json.Unmarshal([]byte(os.Getenv(EnvJob)), &job); err != nil {
		say("cannot read the build job: %v", err)
		return ExitSetup
	}
	say("builder VM up (%s)", builderVersion())
	drives, err := findDrives()
	if err != nil {
		say("%v", err)
		return ExitSetup
	}
	_ = os.MkdirAll("/work", 0o755)
	if err := unix.Mount(drives[DriveCache], "/work", "ext4", unix.MS_NOATIME, ""); err != nil {
		say("the layer cache disk cannot be mounted (%v); it is reset for the next build", err)
		return ExitCache
	}
	defer unix.Unmount("/work", 0)
	p := Paths{Storage: "/work/storage", RunRoot: "/run/containers/storage", Tmp: "/work/tmp", Config: "/etc/containers",
		Source: "/work/src", Output: drives[DriveOutput]}
	if err := os.RemoveAll(p.Source); err != nil {
		say("cannot clear the source directory: %v", err)
		return ExitSetup
	}
	src, err := os.Open(drives[DriveSource])
	if err != nil {
		say("cannot open the source drive: %v", err)
		return ExitSetup
	}
	n, err := Untar(src, p.Source)
	src.Close()
	if err != nil {
		say("cannot unpack the source: %v", err)
		return noSpace(err, ExitSetup, job)
	}
	say("source: %d files", n)
	if err := os.WriteFile("/etc/hosts", []byte("127.0.0.1\tlocalhost\n"+job.Hosts), 0o644); err != nil {
		say("cannot write /etc/hosts: %v", err)
		return ExitSetup
	}
	fw, err := egress.Forward(job.Proxy, job.Routes)
	if err != nil {
		say("%v", err)
		return ExitSetup
	}
	defer fw.Close()
	ctx := context.Background()
	oomBefore := oomKills()
	full := &spotter{w: os.Stdout, text: []byte("no space left on device")}
	err = Build(ctx, job, p, full)
	if err != nil && full.seen {
		err = fmt.Errorf("%w: %w", syscall.ENOSPC, err)
	}
	switch {
	case err == nil:
		unix.Sync()
		return 0
	case errors.Is(err, errNoDockerfile):
		say("%v", err)
		return ExitDockerfile
	case oomKills() > oomBefore:
		say("the build ran out of memory (%d MiB): the kernel killed a build process", job.MemoryMiB)
		return ExitOOM
	default:
		return noSpace(err, ExitFailed, job)
	}
}

// spotter passes output on and notes whether text went by (a message the
// disk filled, which a later cleanup can hide from statfs).
type spotter struct {
	w    io.Writer
	text []byte
	tail []byte
	seen bool
}

func (s *spotter) Write(p []byte) (int, error) {
	if !s.seen {
		buf := append(s.tail, p...)
		s.seen = bytes.Contains(bytes.ToLower(buf), s.text)
		if n := len(s.text); len(buf) > n {
			buf = buf[len(buf)-n:]
		}
		s.tail = append(s.tail[:0], buf...)
	}
	return s.w.Write(p)
}

// noSpace turns a full disk into its own exit code (and message).
func noSpace(err error, code int, job Job) int {
	var st unix.Statfs_t
	if errors.Is(err, syscall.ENOSPC) || strings.Contains(err.Error(), "no space left on device") ||
		(unix.Statfs("/work", &st) == nil && st.Bavail*uint64(st.Bsize) < 1<<20) {
		say("the build filled its disk (%d MiB)", job.DiskMiB)
		return ExitNoSpace
	}
	if code == ExitFailed {
		say("build failed: %v", err)
	}
	return code
}

var errNoDockerfile = errors.New("no Dockerfile")

// Build runs buildah for job and writes the image as a docker-archive to
// p.Output. Output goes to out line by line (buildah's own).
func Build(ctx context.Context, job Job, p Paths, out io.Writer) error {
	ctxDir := filepath.Join(p.Source, filepath.FromSlash(path.Clean(job.Context)))
	df := filepath.Join(ctxDir, filepath.FromSlash(path.Clean(job.Dockerfile)))
	if fi, err := os.Stat(df); err != nil || !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: %s is not a file in the source (context %s)", errNoDockerfile, path.Join(job.Context, job.Dockerfile), job.Context)
	}
	if err := writeRegistries(p.Config, job.Insecure); err != nil {
		return err
	}
	global := []string{"--root", p.Storage, "--runroot", p.RunRoot, "--storage-driver", "overlay"}
	// Containers a killed build left in the cache are of no use; a cache
	// disk three quarters full drops the images no tag or step uses.
	if b, err := os.ReadFile(filepath.Join(p.Storage, "overlay-containers", "containers.json")); err == nil && bytes.Contains(b, []byte(`"id"`)) {
		_ = buildah(ctx, p, io.Discard, append(append([]string{}, global...), "rm", "--all")...)
	}
	var st unix.Statfs_t
	if unix.Statfs(p.Storage, &st) == nil && st.Blocks > 0 && st.Bavail*4 < st.Blocks {
		_ = buildah(ctx, p, io.Discard, append(append([]string{}, global...), "rmi", "--prune")...)
	}
	args := append(append([]string{}, global...), "build", "--isolation", "chroot", "--layers", "--force-rm", "--network", "host",
		"--file", df, "--tag", job.Tag)
	keys := make([]string, 0, len(job.BuildArgs))
	for k := range job.BuildArgs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "--build-arg", k+"="+job.BuildArgs[k])
	}
	args = append(args, ctxDir)
	if err := buildah(ctx, p, out, args...); err != nil {
		return err
	}
	// The archive is written to a file, then copied onto the output
	// drive (the device itself cannot be the archive's path).
	archive := filepath.Join(p.Tmp, "output.tar")
	_ = os.Remove(archive)
	defer os.Remove(archive)
	dest := "docker-archive:" + archive + ":" + job.Tag
	if err := buildah(ctx, p, out, append(append([]string{}, global...), "push", "--quiet", job.Tag, dest)...); err != nil {
		return fmt.Errorf("cannot export the image: %w", err)
	}
	if err := copyFile(archive, p.Output); err != nil {
		return fmt.Errorf("cannot write the image to the output drive: %w", err)
	}
	// The tag stays: the next build's image takes it over, and this one
	// stays in the cache until a full disk prunes it.
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func buildah(ctx context.Context, p Paths, out io.Writer, args ...string) error {
	cmd := exec.CommandContext(ctx, "buildah", args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "BUILDAH_ISOLATION=chroot", "STORAGE_DRIVER=overlay", "TMPDIR="+p.Tmp,
		"CONTAINERS_REGISTRIES_CONF="+filepath.Join(p.Config, "registries.conf"))
	_ = os.MkdirAll(p.Tmp, 0o1777)
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("buildah %s: %w", args[len(globalArgs(args))], err)
	}
	return nil
}

// globalArgs returns the leading global options of a buildah command line.
func globalArgs(args []string) []string {
	i := 0
	for i+1 < len(args) && strings.HasPrefix(args[i], "--") {
		i += 2
	}
	return args[:i]
}

func writeRegistries(dir string, insecure []string) error {
	var b strings.Builder
	b.WriteString("unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n")
	for _, r := range insecure {
		fmt.Fprintf(&b, "\n[[registry]]\nlocation = %s\ninsecure = true\n", strconv.Quote(r))
	}
	_ = os.MkdirAll(dir, 0o755)
	return os.WriteFile(filepath.Join(dir, "registries.conf"), []byte(b.String()), 0o644)
}

// findDrives maps the builder's drives to devices: by serial (QEMU), else
// by order after the root disk (Firecracker).
func findDrives() (map[string]string, error) {
	want := []string{DriveCache, DriveSource, DriveOutput}
	out := map[string]string{}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ents, _ := os.ReadDir("/sys/block")
		for _, e := range ents {
			serial, err := os.ReadFile("/sys/block/" + e.Name() + "/serial")
			if err == nil {
				out[strings.TrimSpace(string(serial))] = "/dev/" + e.Name()
			}
		}
		complete := true
		for _, w := range want {
			if _, err := os.Stat(out[w]); out[w] == "" || err != nil {
				complete = false
			}
		}
		if complete {
			return out, nil
		}
		if _, err := os.Stat("/dev/vdd"); err == nil && len(out) == 0 {
			return map[string]string{DriveCache: "/dev/vdb", DriveSource: "/dev/vdc", DriveOutput: "/dev/vdd"}, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the builder's drives did not appear (found %v)", out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Untar unpacks a tar stream (the source tree) into dir through an
// os.Root, so no entry lands outside it; it returns the number of files.
// Devices, FIFOs and hard links are skipped. A tar written to a raw drive
// ends with zero blocks; reading stops there.
func Untar(r io.Reader, dir string) (int, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return 0, err
	}
	defer root.Close()
	tr := tar.NewReader(bufio.NewReaderSize(r, 1<<20))
	files := 0
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files, nil
		}
		if err != nil {
			return files, fmt.Errorf("source archive: %w", err)
		}
		name := path.Clean(strings.TrimPrefix(h.Name, "/"))
		if name == "." || name == ".." || strings.HasPrefix(name, "../") {
			continue
		}
		if d := path.Dir(name); d != "." {
			if err := root.MkdirAll(d, 0o755); err != nil {
				return files, err
			}
		}
		mode := fs.FileMode(h.Mode) & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := root.MkdirAll(name, 0o755); err != nil {
				return files, err
			}
			_ = root.Chmod(name, mode|0o700)
		case tar.TypeReg:
			_ = root.Remove(name)
			f, err := root.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode|0o600)
			if err != nil {
				return files, err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return files, err
			}
			files++
		case tar.TypeSymlink:
			_ = root.Remove(name)
			if err := root.Symlink(h.Linkname, name); err != nil {
				return files, err
			}
		}
		if !h.ModTime.IsZero() && h.Typeflag != tar.TypeSymlink {
			_ = root.Chtimes(name, h.ModTime, h.ModTime)
		}
	}
}

func oomKills() int {
	b, err := os.ReadFile("/proc/vmstat")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	return 0
}

// VersionFile names the builder image's version line (written by
// internal/builderimage), read without starting buildah.
const VersionFile = "/etc/zeitwork-builder"

func builderVersion() string {
	b, err := os.ReadFile(VersionFile)
	if err != nil {
		return "buildah"
	}
	return strings.TrimSpace(string(b))
}

// say prints one of the platform's own log lines.
func say(format string, args ...any) {
	fmt.Printf("zeitwork: "+format+"\n", args...)
}
