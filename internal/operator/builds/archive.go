package builds

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
)

// Limits of an uploaded source archive.
const (
	MaxSourceBytes    = 100 << 20 // compressed, as uploaded
	MaxExpandedBytes  = 2 << 30   // what the tar expands to
	maxArchiveEntries = 200_000
)

// Errors of CheckArchive that callers classify.
var (
	ErrNotGzip  = errors.New("the source is not gzip-compressed (want a .tar.gz of the working tree)")
	ErrTooLarge = fmt.Errorf("the source expands to more than %d MiB", MaxExpandedBytes>>20)
)

// CheckArchive checks that data is a gzipped tar the builder can unpack:
// a gzip stream, tar headers that parse, at most maxArchiveEntries entries
// and MaxExpandedBytes of content. Paths are not judged here: the node
// agent unpacks through os.Root, where ../ and absolute links cannot
// escape.
func CheckArchive(data []byte) error {
	if len(data) < 2 || data[0] != 0x1f || data[1] != 0x8b {
		return ErrNotGzip
	}
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNotGzip, err)
	}
	lr := &io.LimitedReader{R: zr, N: MaxExpandedBytes + 1}
	tr := tar.NewReader(lr)
	entries := 0
	for {
		_, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			if lr.N <= 0 {
				return ErrTooLarge
			}
			return fmt.Errorf("the source is not a valid tar archive: %v", err)
		}
		if entries++; entries > maxArchiveEntries {
			return fmt.Errorf("the source has more than %d entries", maxArchiveEntries)
		}
	}
	if entries == 0 {
		return errors.New("the source archive is empty")
	}
	// The tar end marker is followed by padding; read the gzip stream to
	// its end so its checksum is verified.
	if _, err := io.Copy(io.Discard, lr); err != nil {
		return fmt.Errorf("the source is not a valid gzip stream: %v", err)
	}
	if lr.N <= 0 {
		return ErrTooLarge
	}
	return nil
}
