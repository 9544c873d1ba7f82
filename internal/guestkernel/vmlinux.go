package guestkernel

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/pierrec/lz4/v4"
)

// Firecracker boots only an uncompressed ELF vmlinux, while Debian ships a
// bzImage: a real-mode setup part followed by a compressed copy of that
// ELF. The boot protocol header says where the compressed payload is
// (https://docs.kernel.org/arch/x86/boot.html), so the ELF can be recovered
// without the kernel's build tree (what scripts/extract-vmlinux does by
// scanning for magics).

// Offsets in the x86 boot protocol header.
const (
	hdrSetupSects    = 0x1f1 // uint8, 0 means 4
	hdrMagic         = 0x202 // "HdrS"
	hdrVersion       = 0x206 // uint16, payload fields since 2.08
	hdrPayloadOffset = 0x248 // uint32, from the start of the protected-mode code
	hdrPayloadLength = 0x24c // uint32
	hdrEnd           = 0x250
)

// maxVmlinux bounds decompression; a guest kernel is tens of MiB.
const maxVmlinux = 512 << 20

// ErrNotBzImage means the file has no x86 boot protocol header.
var ErrNotBzImage = errors.New("not a bzImage (no HdrS boot header)")

// payload locates the compressed kernel inside a bzImage.
func payload(bz []byte) (start, length int, err error) {
	if len(bz) < hdrEnd {
		return 0, 0, ErrNotBzImage
	}
	if string(bz[hdrMagic:hdrMagic+4]) != "HdrS" {
		return 0, 0, ErrNotBzImage
	}
	if v := binary.LittleEndian.Uint16(bz[hdrVersion:]); v < 0x208 {
		return 0, 0, fmt.Errorf("boot protocol %d.%02d has no payload fields (need 2.08)", v>>8, v&0xff)
	}
	sects := int(bz[hdrSetupSects])
	if sects == 0 {
		sects = 4
	}
	off := binary.LittleEndian.Uint32(bz[hdrPayloadOffset:])
	n := binary.LittleEndian.Uint32(bz[hdrPayloadLength:])
	start = (sects+1)*512 + int(off)
	length = int(n)
	if length == 0 || start > len(bz) || length > len(bz)-start {
		return 0, 0, fmt.Errorf("payload %d+%d lies outside the %d-byte image", start, length, len(bz))
	}
	return start, length, nil
}

// Compression formats a bzImage payload may use, by magic.
var payloadFormats = []struct {
	name  string
	magic []byte
}{
	{"lz4", []byte{0x02, 0x21, 0x4c, 0x18}}, // legacy frame, what Debian's cloud kernel uses
	{"gzip", []byte{0x1f, 0x8b}},
	{"xz", []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}},
	{"zstd", []byte{0x28, 0xb5, 0x2f, 0xfd}},
	{"bzip2", []byte{'B', 'Z', 'h'}},
	{"lzo", []byte{0x89, 'L', 'Z', 'O'}},
	{"lzma", []byte{0x5d, 0x00, 0x00}},
}

func payloadFormat(p []byte) string {
	for _, f := range payloadFormats {
		if bytes.HasPrefix(p, f.magic) {
			return f.name
		}
	}
	return ""
}

// ExtractVmlinux returns the ELF kernel inside a bzImage. LZ4 (legacy
// frame) and gzip payloads are supported; other formats are named in the
// error.
func ExtractVmlinux(bz []byte) ([]byte, error) {
	start, n, err := payload(bz)
	if err != nil {
		return nil, err
	}
	p := bz[start : start+n]
	var r io.Reader
	switch f := payloadFormat(p); f {
	case "lz4":
		// The kernel appends the uncompressed size to the legacy frame;
		// the reader knows this variant.
		r = lz4.NewReader(bytes.NewReader(p))
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(p))
		if err != nil {
			return nil, fmt.Errorf("cannot read gzip payload: %w", err)
		}
		zr.Multistream(false) // the uncompressed size follows the stream
		r = zr
	case "":
		return nil, fmt.Errorf("unknown compression of the kernel payload (starts %x)", p[:min(len(p), 6)])
	default:
		return nil, fmt.Errorf("%s-compressed kernel payloads are not supported (lz4 and gzip are)", f)
	}
	var out bytes.Buffer
	m, err := io.Copy(&out, io.LimitReader(r, maxVmlinux+1))
	if err != nil {
		return nil, fmt.Errorf("cannot decompress the kernel payload: %w", err)
	}
	if m > maxVmlinux {
		return nil, fmt.Errorf("kernel payload decompresses to more than %d MiB", maxVmlinux>>20)
	}
	if err := checkELF(out.Bytes()); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// checkELF accepts a 64-bit x86 executable with at least one loadable
// segment: what Firecracker's loader needs.
func checkELF(b []byte) error {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("decompressed kernel is not an ELF file: %w", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("decompressed kernel is %v %v, want ELFCLASS64 EM_X86_64", f.Class, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD {
			return nil
		}
	}
	return errors.New("decompressed kernel has no PT_LOAD segment")
}

// EnsureVmlinux returns the ELF kernel extracted from bzImage, cached as
// "vmlinux" in the bzImage's directory and written atomically (concurrent
// callers each write a temporary file; the last rename wins with identical
// content). A cached file older than the bzImage is rebuilt.
func EnsureVmlinux(bzImage string) (string, error) {
	out := filepath.Join(filepath.Dir(bzImage), "vmlinux")
	src, err := os.Stat(bzImage)
	if err != nil {
		return "", err
	}
	if st, err := os.Stat(out); err == nil && !st.ModTime().Before(src.ModTime()) {
		return out, nil
	}
	bz, err := os.ReadFile(bzImage)
	if err != nil {
		return "", err
	}
	elfBytes, err := ExtractVmlinux(bz)
	if err != nil {
		return "", fmt.Errorf("cannot extract vmlinux from %s: %w", bzImage, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), ".vmlinux-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(elfBytes); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return "", err
	}
	return out, nil
}
