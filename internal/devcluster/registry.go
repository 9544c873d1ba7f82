package devcluster

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Registry is an OCI registry served on loopback, holding the images the
// cluster deploys (the bundled sample app, test images).
type Registry struct {
	Addr string // host:port
	srv  *http.Server
	proc *Proc // the distribution registry, when it runs as a process
	done chan struct{}
}

// DistributionBin is Debian's build of the CNCF distribution registry
// (package docker-registry).
const DistributionBin = "/usr/bin/docker-registry"

// StartDistribution runs the distribution registry as a process on addr
// ("127.0.0.1:0" picks a free port) with its storage in dir: the
// platform's registry as production runs it, for builds from source.
func StartDistribution(ctx context.Context, addr, dir string) (*Registry, error) {
	if addr == "" || strings.HasSuffix(addr, ":0") {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, err
		}
		addr = ln.Addr().String()
		ln.Close()
	}
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
		return nil, err
	}
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: true
      age: 1h
      interval: 10m
      dryrun: false
http:
  addr: %s
health:
  storagedriver:
    enabled: true
`, filepath.Join(dir, "data"), addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	p := &Proc{Name: "registry", Path: DistributionBin, Args: []string{"serve", cfgPath}, LogFile: filepath.Join(dir, "registry.log"),
		Health: "http://" + addr + "/v2/"}
	if err := p.Start(ctx, 30*time.Second); err != nil {
		return nil, err
	}
	return &Registry{Addr: addr, proc: p}, nil
}

// StartRegistry serves an in-memory OCI registry on addr ("127.0.0.1:0"
// picks a free port).
func StartRegistry(addr string) (*Registry, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cannot listen for the registry on %s: %w", addr, err)
	}
	r := &Registry{
		Addr: ln.Addr().String(),
		srv:  &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0))), ReadHeaderTimeout: 10 * time.Second},
		done: make(chan struct{}),
	}
	go func() { // owned by r: ends on Close
		defer close(r.done)
		if err := r.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Printf("registry: %v", err)
		}
	}()
	return r, nil
}

// Close stops the registry.
func (r *Registry) Close() error {
	if r.proc != nil {
		return r.proc.Stop(10 * time.Second)
	}
	err := r.srv.Close()
	<-r.done
	return err
}

// SampleImage describes an image of the bundled sample app.
type SampleImage struct {
	Binary  string            // path of the static hello binary
	Env     map[string]string // baked into the image config
	User    string            // numeric "uid:gid"; empty = root
	WorkDir string
}

// PushSample builds an image holding the sample app and pushes it as
// repo:tag. It returns the reference by digest.
func (r *Registry) PushSample(ctx context.Context, repo, tag string, s SampleImage) (string, error) {
	bin, err := os.ReadFile(s.Binary)
	if err != nil {
		return "", fmt.Errorf("cannot read sample app binary: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	now := time.Unix(1700000000, 0)
	dirs := []string{"app/", "etc/", "tmp/"}
	for _, d := range dirs {
		mode := int64(0o755)
		if d == "tmp/" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: mode, ModTime: now}); err != nil {
			return "", err
		}
	}
	files := []struct {
		name string
		mode int64
		data []byte
	}{
		{"app/hello", 0o755, bin},
		{"etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n")},
		{"etc/group", 0o644, []byte("root:x:0:\napp:x:1000:\n")},
	}
	for _, f := range files {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: f.mode, Size: int64(len(f.data)), ModTime: now}); err != nil {
			return "", err
		}
		if _, err := tw.Write(f.data); err != nil {
			return "", err
		}
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	layerBytes := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layerBytes)), nil })
	if err != nil {
		return "", err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return "", err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return "", err
	}
	cfg = cfg.DeepCopy()
	cfg.Architecture, cfg.OS = "amd64", "linux"
	cfg.Config.Entrypoint = []string{"/app/hello"}
	cfg.Config.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "PORT=8080"}
	for k, v := range s.Env {
		cfg.Config.Env = append(cfg.Config.Env, k+"="+v)
	}
	cfg.Config.WorkingDir = s.WorkDir
	if cfg.Config.WorkingDir == "" {
		cfg.Config.WorkingDir = "/app"
	}
	cfg.Config.User = s.User
	cfg.Config.ExposedPorts = map[string]struct{}{"8080/tcp": {}}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return "", err
	}
	ref, err := name.NewTag(fmt.Sprintf("%s/%s:%s", r.Addr, repo, tag), name.Insecure)
	if err != nil {
		return "", err
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		return "", fmt.Errorf("cannot push %s: %w", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		return "", err
	}
	return ref.Context().Digest(d.String()).String(), nil
}
