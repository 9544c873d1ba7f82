package nodeagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/zeitwork/zeitwork/internal/build"
	"github.com/zeitwork/zeitwork/internal/builder"
	"github.com/zeitwork/zeitwork/internal/builderimage"
	"github.com/zeitwork/zeitwork/internal/egress"
	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/gitsource"
	"github.com/zeitwork/zeitwork/internal/httpjson"
)

// BuildConfig is the node's part in builds from source.
type BuildConfig struct {
	Concurrency int // 0 = this node runs no builds
	VCPUs       int
	MemoryMiB   int
	DiskMiB     int
	Egress      []egress.Endpoint
	MaxSource   int64  // bytes of an unpacked source tree
	ImageDir    string // where the builder root disk is cached (default VM_WORK_DIR/builder)
}

// DefaultBuildEgress is where builds may connect unless BUILD_EGRESS says
// otherwise: the public registries and package mirrors Dockerfiles
// commonly use.
var DefaultBuildEgress = []string{
	"registry-1.docker.io:443", "auth.docker.io:443", "production.cloudflare.docker.com:443",
	"ghcr.io:443", "pkg-containers.githubusercontent.com:443", "quay.io:443", "cdn01.quay.io:443",
	"gcr.io:443", "public.ecr.aws:443",
	"deb.debian.org:80", "deb.debian.org:443", "security.debian.org:80", "dl-cdn.alpinelinux.org:443",
	"proxy.golang.org:443", "sum.golang.org:443", "registry.npmjs.org:443", "pypi.org:443", "files.pythonhosted.org:443",
}

func loadBuildConfig(l *envconfig.Loader) BuildConfig {
	c := BuildConfig{
		Concurrency: l.Int("BUILD_CONCURRENCY", 1, 0, 64),
		VCPUs:       l.Int("BUILD_VCPUS", 2, 1, 64),
		MemoryMiB:   l.Int("BUILD_MEMORY_MIB", 2048, 256, build.MaxMemoryMiB),
		DiskMiB:     l.Int("BUILD_DISK_MIB", 10240, 256, build.MaxDiskMiB),
		MaxSource:   int64(l.Int("BUILD_MAX_SOURCE_MIB", 2048, 1, 1<<20)) << 20,
		ImageDir:    l.String("BUILD_IMAGE_DIR", ""),
	}
	for _, s := range l.List("BUILD_EGRESS", DefaultBuildEgress) {
		e, err := egress.ParseEndpoint(s)
		if err != nil {
			l.Errorf("BUILD_EGRESS", "%v", err)
			continue
		}
		c.Egress = append(c.Egress, e)
	}
	return c
}

// newBuilder sets up builds on this node (nil when it runs none).
func (a *Agent) newBuilder(initBin string) (*builder.Builder, error) {
	bc := a.cfg.Build
	if bc.Concurrency == 0 {
		return nil, nil
	}
	git := &gitsource.Fetcher{CacheDir: filepath.Join(a.cfg.WorkDir, "git"), MaxBytes: bc.MaxSource}
	var diskMu sync.Mutex
	imageDir := bc.ImageDir
	if imageDir == "" {
		imageDir = filepath.Join(a.cfg.WorkDir, "builder")
	}
	return builder.New(builder.Config{
		WorkDir: filepath.Join(a.cfg.WorkDir, "build"), Concurrency: bc.Concurrency, VCPUs: bc.VCPUs,
		MemoryMiB: bc.MemoryMiB, DiskMiB: bc.DiskMiB, Egress: bc.Egress, Insecure: a.cfg.Insecure,
	}, builder.Deps{
		VMM: a.vmm, Net: a.net, Kernel: a.kernel.BzImage, Initrd: a.kernel.Initrd, Log: a.log,
		RootDisk: func(ctx context.Context) (string, error) {
			diskMu.Lock()
			defer diskMu.Unlock()
			return builderimage.Ensure(ctx, imageDir, initBin)
		},
		Source: func(ctx context.Context, src build.Source, w io.Writer) error {
			if src.GitURL != "" {
				_, err := git.Archive(ctx, src.GitURL, src.CommitSHA, src.GitToken, w)
				return err
			}
			return a.fetchArchive(ctx, src.ArchivePath, w)
		},
	})
}

// fetchArchive downloads an uploaded source archive from the first
// operator that has it and writes it unpacked (a tar) to w.
func (a *Agent) fetchArchive(ctx context.Context, path string, w io.Writer) error {
	if len(a.cfg.Operators) == 0 {
		return errors.New("no OPERATOR_URL to fetch the source archive from")
	}
	client := &http.Client{Timeout: 10 * time.Minute}
	var lastErr error
	for _, op := range a.cfg.Operators {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, op.JoinPath(path).String(), nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+a.cfg.Token)
		resp, err := client.Do(req)
		if err != nil {
			lastErr = err
			continue
		}
		if resp.StatusCode != http.StatusOK {
			msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			resp.Body.Close()
			lastErr = fmt.Errorf("operator answered %s: %s", resp.Status, msg)
			continue
		}
		err = builder.GunzipTo(w, resp.Body, a.cfg.Build.MaxSource)
		resp.Body.Close()
		return err
	}
	return fmt.Errorf("cannot fetch the source archive: %w", lastErr)
}

// buildRoutes adds the build API (see internal/build) to the agent's mux.
func (a *Agent) buildRoutes(api *http.ServeMux) {
	b := a.builds
	disabled := func(w http.ResponseWriter) bool {
		if b == nil {
			httpjson.Write(w, 409, httpjson.Error("builds_disabled", "this node runs no builds (BUILD_CONCURRENCY=0)"))
			return true
		}
		return false
	}
	api.HandleFunc("POST /builds", func(w http.ResponseWriter, r *http.Request) {
		if disabled(w) {
			return
		}
		var spec build.Spec
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&spec); err != nil {
			httpjson.Write(w, 400, httpjson.Error("invalid_json", err.Error()))
			return
		}
		st, err := b.Start(spec)
		if err != nil {
			writeBuildErr(w, err)
			return
		}
		httpjson.Write(w, 202, st)
	})
	api.HandleFunc("GET /builds", func(w http.ResponseWriter, r *http.Request) {
		if b == nil {
			httpjson.Write(w, 200, []build.Status{})
			return
		}
		httpjson.Write(w, 200, b.List())
	})
	api.HandleFunc("GET /builds/{id}", func(w http.ResponseWriter, r *http.Request) {
		if disabled(w) {
			return
		}
		st, err := b.Get(r.PathValue("id"))
		if err != nil {
			writeBuildErr(w, err)
			return
		}
		httpjson.Write(w, 200, st)
	})
	api.HandleFunc("POST /builds/{id}/cancel", func(w http.ResponseWriter, r *http.Request) {
		if disabled(w) {
			return
		}
		st, err := b.Cancel(r.PathValue("id"))
		if err != nil {
			writeBuildErr(w, err)
			return
		}
		httpjson.Write(w, 202, st)
	})
	api.HandleFunc("DELETE /builds/{id}", func(w http.ResponseWriter, r *http.Request) {
		if disabled(w) {
			return
		}
		if err := b.Delete(r.PathValue("id")); err != nil {
			writeBuildErr(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	api.HandleFunc("GET /builds/{id}/logs", func(w http.ResponseWriter, r *http.Request) {
		if disabled(w) {
			return
		}
		id := r.PathValue("id")
		follow := r.URL.Query().Get("follow") == "1" || r.URL.Query().Get("follow") == "true"
		since, _ := strconv.Atoi(r.URL.Query().Get("since"))
		lines, wake, done, err := b.Logs(id, since)
		if err != nil {
			writeBuildErr(w, err)
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		fl, _ := w.(http.Flusher)
		for {
			for _, l := range lines {
				if enc.Encode(l) != nil {
					return
				}
				since = l.Seq
			}
			if fl != nil {
				fl.Flush()
			}
			if !follow || done {
				return
			}
			select {
			case <-r.Context().Done():
				return
			case <-wake:
			}
			if lines, wake, done, err = b.Logs(id, since); err != nil {
				return
			}
		}
	})
}

func writeBuildErr(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, builder.ErrNotFound):
		httpjson.Write(w, 404, httpjson.Error("not_found", err.Error()))
	case errors.Is(err, build.ErrInvalid):
		httpjson.Write(w, 400, httpjson.Error("invalid", err.Error()))
	case errors.Is(err, builder.ErrConflict):
		httpjson.Write(w, 409, httpjson.Error("conflict", err.Error()))
	default:
		httpjson.Write(w, 500, httpjson.Error("internal", err.Error()))
	}
}
