package rootfs

import (
	"context"
	"fmt"
	"io/fs"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// MakeExt4 builds an ext4 image of dir with `mkfs.ext4 -d` (e2fsprogs ≥
// 1.43; no mounts, no root privileges needed beyond reading dir), sized to
// the content plus 10% metadata slack plus headroom for the app's writes.
// The image has no journal: every VM writes to its own copy-on-write
// overlay, which is thrown away with the VM.
func MakeExt4(ctx context.Context, dir, out string, headroom int64) error {
	used, inodes, err := usage(dir)
	if err != nil {
		return fmt.Errorf("cannot measure %s: %w", dir, err)
	}
	inodes = inodes + inodes/2 + 1024
	size := used + used/10 + inodes*256 + headroom + 4<<20
	size = (size + 1<<20 - 1) &^ (1<<20 - 1)
	cmd := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-d", dir,
		"-b", "4096", "-I", "256", "-N", strconv.FormatInt(inodes, 10), "-m", "0",
		"-O", "^has_journal", "-E", "root_owner=0:0,lazy_itable_init=0", "-L", "zeitwork-root",
		out, strconv.FormatInt(size/1024, 10)+"k")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4: %v: %s", err, strings.TrimSpace(string(b)))
	}
	return nil
}

// usage returns the space dir's content takes in 4 KiB blocks (each inode
// once, so hard links are not counted twice) and its inode count.
func usage(dir string) (bytes, inodes int64, err error) {
	seen := map[uint64]bool{}
	err = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 && !fi.IsDir() {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
		}
		inodes++
		switch {
		case fi.IsDir():
			bytes += 4096
		case fi.Mode().IsRegular():
			bytes += (fi.Size() + 4095) &^ 4095
		case fi.Mode()&fs.ModeSymlink != 0 && fi.Size() > 59:
			bytes += 4096 // longer targets than fit in the inode
		}
		return nil
	})
	return bytes, inodes, err
}
