package guestkernel

import (
	"fmt"
	"io"
)

type cpioFile struct {
	name string
	mode uint32
	dir  bool
	data []byte
}

// writeCpio writes files as an uncompressed "newc" archive, the format the
// kernel unpacks into its initial rootfs.
func writeCpio(w io.Writer, files []cpioFile) error {
	ino := 1
	write := func(name string, mode uint32, data []byte) error {
		hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
		ino++
		if _, err := io.WriteString(w, hdr+name+"\x00"); err != nil {
			return err
		}
		if err := pad(w, len(hdr)+len(name)+1); err != nil {
			return err
		}
		if _, err := w.Write(data); err != nil {
			return err
		}
		return pad(w, len(data))
	}
	for _, f := range files {
		mode := f.mode | 0o100000
		if f.dir {
			mode = 0o040755
		}
		if err := write(f.name, mode, f.data); err != nil {
			return err
		}
	}
	return write("TRAILER!!!", 0, nil)
}

func pad(w io.Writer, n int) error {
	if r := n % 4; r != 0 {
		_, err := w.Write(make([]byte, 4-r))
		return err
	}
	return nil
}
