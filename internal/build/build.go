// Package build is the contract of a build from source between the
// operator, which queues and schedules builds, and the node agent, which
// runs each one in an isolated builder microVM (docs/adr/0600): the build
// spec the operator sends (POST /builds on the node agent), the status the
// agent reports (GET /builds/{id}, and every heartbeat), and the log lines
// it streams (GET /builds/{id}/logs, NDJSON).
package build

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"strings"
	"time"
)

// Build states. queued → running → succeeded | failed | canceled.
const (
	StateQueued    = "queued"
	StateRunning   = "running"
	StateSucceeded = "succeeded"
	StateFailed    = "failed"
	StateCanceled  = "canceled"
)

// Terminal reports whether state is final.
func Terminal(state string) bool {
	return state == StateSucceeded || state == StateFailed || state == StateCanceled
}

// Source is where a build's files come from: a git repository at one
// commit, or an archive (a gzipped tar of a working tree) uploaded to the
// operator and fetched by the node agent from the operators' internal API
// (ArchivePath, relative to an operator URL, with the cluster token).
type Source struct {
	GitURL      string `json:"git_url,omitempty"`
	CommitSHA   string `json:"commit_sha,omitempty"`
	GitToken    string `json:"git_token,omitempty"` // HTTPS token for a private repository; never logged
	ArchivePath string `json:"archive_path,omitempty"`
}

// Spec is the body of POST /builds on a node agent.
type Spec struct {
	ID           string            `json:"id"`
	DeploymentID string            `json:"deployment_id"`
	ProjectID    string            `json:"project_id"` // the layer cache is per project
	Source       Source            `json:"source"`
	Dockerfile   string            `json:"dockerfile"` // relative to Context; default "Dockerfile"
	Context      string            `json:"context"`    // directory in the source; default "."
	BuildArgs    map[string]string `json:"build_args,omitempty"`
	// Image is where the result is pushed, by tag: <registry>/<org>/<project>:<tag>.
	Image     string `json:"image"`
	TimeoutS  int    `json:"timeout_s"`  // wall-clock limit of the whole build
	VCPUs     int    `json:"vcpus"`      // 0 = the agent's default
	MemoryMiB int    `json:"memory_mib"` // 0 = the agent's default
	DiskMiB   int    `json:"disk_mib"`   // 0 = the agent's default
}

// Status is a build as a node agent reports it.
type Status struct {
	ID           string     `json:"id"`
	DeploymentID string     `json:"deployment_id"`
	State        string     `json:"state"`
	Image        string     `json:"image,omitempty"` // on success: <repository>@sha256:…
	Error        string     `json:"error,omitempty"` // on failure: the cause, then the builder's last lines
	CacheHits    int        `json:"cache_hits"`      // build steps answered from the layer cache
	Steps        int        `json:"steps"`           // build steps run or reused
	CreatedAt    time.Time  `json:"created_at"`
	StartedAt    *time.Time `json:"started_at,omitempty"`
	FinishedAt   *time.Time `json:"finished_at,omitempty"`
}

// LogLine is one line of a build log (NDJSON on the wire). Stream is
// "build" for the builder's output and "zeitwork" for the platform's own
// lines (fetching source, booting the builder, pushing).
type LogLine struct {
	Seq    int       `json:"seq"`
	Time   time.Time `json:"time"`
	Stream string    `json:"stream"`
	Line   string    `json:"line"`
}

// Limits a spec may ask for.
const (
	MaxTimeoutS  = 6 * 3600
	MaxDiskMiB   = 1 << 20
	MaxMemoryMiB = 1 << 16
	MaxBuildArgs = 64
)

var (
	idRE    = regexp.MustCompile(`^[0-9a-zA-Z-]{1,64}$`)
	shaRE   = regexp.MustCompile(`^[0-9a-f]{40}([0-9a-f]{24})?$`)
	argRE   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)
	imageRE = regexp.MustCompile(`^[a-zA-Z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)+:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
)

// ErrInvalid classifies a spec the agent refuses.
var ErrInvalid = errors.New("invalid build spec")

// Validate checks a spec and fills defaults; errors wrap ErrInvalid and
// name the field.
func (s *Spec) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
	}
	if !idRE.MatchString(s.ID) {
		return bad("id %q", s.ID)
	}
	switch {
	case s.Source.GitURL != "" && s.Source.ArchivePath != "":
		return bad("source has both git_url and archive_path")
	case s.Source.GitURL != "":
		if !shaRE.MatchString(s.Source.CommitSHA) {
			return bad("commit_sha %q is not a full hex commit id", s.Source.CommitSHA)
		}
		if strings.HasPrefix(s.Source.GitURL, "-") || strings.ContainsAny(s.Source.GitURL, " \t\r\n") {
			return bad("git_url %q", s.Source.GitURL)
		}
	case s.Source.ArchivePath != "":
		if !strings.HasPrefix(s.Source.ArchivePath, "/") || strings.Contains(s.Source.ArchivePath, "..") {
			return bad("archive_path %q", s.Source.ArchivePath)
		}
	default:
		return bad("source needs git_url or archive_path")
	}
	if s.Dockerfile == "" {
		s.Dockerfile = "Dockerfile"
	}
	if s.Context == "" {
		s.Context = "."
	}
	for what, p := range map[string]string{"dockerfile": s.Dockerfile, "context": s.Context} {
		if err := RelPath(p); err != nil {
			return bad("%s: %v", what, err)
		}
	}
	if len(s.BuildArgs) > MaxBuildArgs {
		return bad("more than %d build args", MaxBuildArgs)
	}
	for k, v := range s.BuildArgs {
		if !argRE.MatchString(k) || len(v) > 4096 || strings.ContainsRune(v, 0) {
			return bad("build arg %q", k)
		}
	}
	if !imageRE.MatchString(s.Image) || len(s.Image) > 512 {
		return bad("image %q is not <registry>/<repository>:<tag>", s.Image)
	}
	if s.TimeoutS <= 0 || s.TimeoutS > MaxTimeoutS {
		return bad("timeout_s %d is outside 1..%d", s.TimeoutS, MaxTimeoutS)
	}
	if s.VCPUs < 0 || s.VCPUs > 64 || s.MemoryMiB < 0 || s.MemoryMiB > MaxMemoryMiB || s.DiskMiB < 0 || s.DiskMiB > MaxDiskMiB {
		return bad("resources out of range")
	}
	if s.MemoryMiB != 0 && s.MemoryMiB < 256 {
		return bad("memory_mib %d is below 256", s.MemoryMiB)
	}
	if s.DiskMiB != 0 && s.DiskMiB < 256 {
		return bad("disk_mib %d is below 256", s.DiskMiB)
	}
	return nil
}

// RelPath checks a path inside the source tree: relative, clean, no "..".
func RelPath(p string) error {
	if p == "" || len(p) > 1024 || strings.ContainsRune(p, 0) || strings.Contains(p, "\\") {
		return fmt.Errorf("%q is not a relative path", p)
	}
	if path.IsAbs(p) {
		return fmt.Errorf("%q is absolute; give a path relative to the repository root", p)
	}
	c := path.Clean(p)
	if c == ".." || strings.HasPrefix(c, "../") {
		return fmt.Errorf("%q leaves the source tree", p)
	}
	return nil
}
