// Package fsutil writes files so that a reader sees either the old content
// or the new one, never a part of it.
package fsutil

import (
	"os"
	"path/filepath"
)

// WriteFile writes data to path with permissions perm through a temporary
// file in the same directory, renamed over path. Concurrent writers each
// use their own temporary file; a failure leaves path as it was and no
// temporary file behind. It does not fsync: what it protects against is
// readers and crashed writers, not power loss.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}
