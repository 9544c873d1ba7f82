package cli

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/zeitwork/zeitwork/internal/apiclient"
)

// MaxSourceBytes is the operator's limit for an uploaded source archive.
const MaxSourceBytes = 100 << 20

var errSourceTooLarge = fmt.Errorf("the source archive exceeds %d MiB", MaxSourceBytes>>20)

// limitWriter fails once more than n bytes were written.
type limitWriter struct {
	w io.Writer
	n int64
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > l.n {
		return 0, errSourceTooLarge
	}
	l.n -= int64(len(p))
	return l.w.Write(p)
}

// ArchiveDir writes dir as a gzipped tar to w: regular files, directories
// and symlinks (as links, never followed), in lexical order with
// forward-slash names relative to dir, owned by 0:0, so the same tree
// gives the same archive. Every .git directory is left out; other file
// types (sockets, devices, FIFOs) are skipped. It fails once the archive
// exceeds limit bytes.
func ArchiveDir(dir string, w io.Writer, limit int64) error {
	lw := &limitWriter{w: w, n: limit}
	zw := gzip.NewWriter(lw)
	tw := tar.NewWriter(zw)
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fmt.Errorf("cannot open %s: %w", dir, err)
	}
	defer root.Close()
	err = fs.WalkDir(root.FS(), ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if name == "." {
			return nil
		}
		if d.Name() == ".git" {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil // a worktree's .git file
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		var link string
		switch {
		case info.Mode().IsRegular(), info.IsDir():
		case info.Mode()&fs.ModeSymlink != 0:
			if link, err = root.Readlink(name); err != nil {
				return err
			}
		default:
			return nil
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		hdr.Name = name
		if info.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "", ""
		hdr.ModTime = info.ModTime().Truncate(time.Second)
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !info.Mode().IsRegular() {
			return nil
		}
		f, err := root.Open(name)
		if err != nil {
			return err
		}
		defer f.Close()
		if n, err := io.Copy(tw, f); err != nil {
			return err
		} else if n != hdr.Size {
			return fmt.Errorf("%s changed while it was archived", name)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

// uploadDir archives dir and uploads it to the project.
func (a *app) uploadDir(ctx context.Context, c *apiclient.Client, project, dir string) (*apiclient.Source, error) {
	var buf bytes.Buffer
	if err := ArchiveDir(dir, &buf, MaxSourceBytes); errors.Is(err, errSourceTooLarge) {
		return nil, &exitError{code: ExitUsage, err: fmt.Errorf("%s: %w", dir, err), hint: "leave build outputs and dependencies (node_modules, target/, …) out of the source directory"}
	} else if err != nil {
		return nil, err
	}
	a.progress("uploading %s (%.1f MiB)", dir, float64(buf.Len())/(1<<20))
	src, err := c.UploadSource(ctx, project, &buf)
	if err != nil {
		return nil, classify(err)
	}
	return src, nil
}

// printBuildLog follows a build's log until the build ends, line by line.
func (a *app) printBuildLog(ctx context.Context, c *apiclient.Client, id string, follow bool, out io.Writer) error {
	body, err := c.BuildLogs(ctx, id, follow)
	if err != nil {
		return classify(err)
	}
	defer body.Close()
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if a.jsonOut {
			fmt.Fprintln(out, sc.Text())
			continue
		}
		var l apiclient.BuildLogLine
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			continue
		}
		if l.Stream == "zeitwork" {
			fmt.Fprintf(out, "==> %s\n", l.Line)
		} else {
			fmt.Fprintln(out, l.Line)
		}
	}
	return sc.Err()
}

func buildsCommand(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "builds", Short: "Builds from source of the project"}
	cmd.AddCommand(&cobra.Command{Use: "ls", Short: "List builds, newest first", Args: cobra.NoArgs, RunE: func(cmd *cobra.Command, _ []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		p, err := a.projectName()
		if err != nil {
			return err
		}
		list, err := c.Builds(cmd.Context(), p)
		if err != nil {
			return classify(err)
		}
		if a.jsonOut {
			return a.emitJSON(map[string]any{"builds": list})
		}
		var rows [][]string
		for _, b := range list {
			src := b.CommitSHA
			if len(src) > 12 {
				src = src[:12]
			}
			if b.SourceKind == "archive" {
				src = "src-" + b.SourceSHA256[:min(12, len(b.SourceSHA256))]
			}
			took := "-"
			if b.StartedAt != nil && b.FinishedAt != nil {
				took = b.FinishedAt.Sub(*b.StartedAt).Round(time.Second).String()
			}
			result := b.ImageDigestRef
			if b.Error != "" {
				result, _, _ = strings.Cut(b.Error, "\n")
			}
			rows = append(rows, []string{b.ID, b.State, b.CreatedAt.Local().Format("2006-01-02 15:04:05"), firstNonEmpty(b.Branch, "-"), src, took, result})
		}
		a.table([]string{"ID", "STATE", "CREATED", "BRANCH", "SOURCE", "TOOK", "RESULT"}, rows)
		return nil
	}})
	var follow bool
	logs := &cobra.Command{Use: "logs BUILD", Short: "Show a build's log", Args: cobra.ExactArgs(1), RunE: func(cmd *cobra.Command, args []string) error {
		c, err := a.client()
		if err != nil {
			return err
		}
		return a.printBuildLog(cmd.Context(), c, args[0], follow, a.stdout)
	}}
	logs.Flags().BoolVarP(&follow, "follow", "f", false, "keep streaming until the build ends")
	cmd.AddCommand(logs)
	return cmd
}
