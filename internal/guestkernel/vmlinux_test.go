package guestkernel

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// cachedKernel returns the test suite's cached Debian kernel, fetching it
// when absent. The init binary only names the initramfs; a fixed dummy
// keeps it to one cache entry.
func cachedKernel(t *testing.T) *Kernel {
	t.Helper()
	initBin := filepath.Join(t.TempDir(), "init")
	if err := os.WriteFile(initBin, []byte("guestkernel test init\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	k, err := Ensure(t.Context(), "/var/cache/zeitwork-test/kernel", initBin)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestVmlinuxFromDebianKernel checks that Ensure extracts the real
// kernel's ELF: x86-64, loadable, entry inside a PT_LOAD segment, and
// that a repeated call reuses the cache.
func TestVmlinuxFromDebianKernel(t *testing.T) {
	k := cachedKernel(t)
	if k.Vmlinux == "" || filepath.Dir(k.Vmlinux) != filepath.Dir(k.BzImage) {
		t.Fatalf("Vmlinux = %q, want a file next to %s", k.Vmlinux, k.BzImage)
	}
	f, err := elf.Open(k.Vmlinux)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 || f.Class != elf.ELFCLASS64 || f.Type != elf.ET_EXEC {
		t.Fatalf("ELF %v %v %v", f.Machine, f.Class, f.Type)
	}
	var entryLoaded bool
	for _, p := range f.Progs {
		// The entry is a physical address for the boot loader (Firecracker
		// loads by paddr).
		if p.Type == elf.PT_LOAD && f.Entry >= p.Paddr && f.Entry < p.Paddr+p.Memsz {
			entryLoaded = true
		}
	}
	if !entryLoaded {
		t.Fatalf("entry %#x is in no PT_LOAD segment", f.Entry)
	}
	if f.Section(".text") == nil {
		t.Fatal("no .text section")
	}
	bz, _ := os.Stat(k.BzImage)
	vm, _ := os.Stat(k.Vmlinux)
	if vm.Size() <= bz.Size() {
		t.Fatalf("vmlinux (%d bytes) not larger than the bzImage (%d)", vm.Size(), bz.Size())
	}
	again, err := EnsureVmlinux(k.BzImage)
	if err != nil || again != k.Vmlinux {
		t.Fatalf("second EnsureVmlinux = %q, %v", again, err)
	}
	if st, _ := os.Stat(again); !st.ModTime().Equal(vm.ModTime()) {
		t.Fatal("cached vmlinux was rewritten")
	}
}

// bzImage builds a minimal image: 1 setup sector after the boot sector,
// then the payload at payloadOffset into the protected-mode part.
func bzImage(payload []byte, payloadOffset int) []byte {
	const sects = 1
	pm := (sects + 1) * 512
	b := make([]byte, pm+payloadOffset+len(payload))
	b[hdrSetupSects] = sects
	copy(b[hdrMagic:], "HdrS")
	binary.LittleEndian.PutUint16(b[hdrVersion:], 0x20f)
	binary.LittleEndian.PutUint32(b[hdrPayloadOffset:], uint32(payloadOffset))
	binary.LittleEndian.PutUint32(b[hdrPayloadLength:], uint32(len(payload)))
	copy(b[pm+payloadOffset:], payload)
	return b
}

// TestExtractVmlinuxErrors covers the header checks and the named
// unsupported formats.
func TestExtractVmlinuxErrors(t *testing.T) {
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte("not an ELF file at all"))
	zw.Close()
	tooLong := bzImage([]byte{0x1f, 0x8b}, 16)
	binary.LittleEndian.PutUint32(tooLong[hdrPayloadLength:], 1<<20)
	oldProto := bzImage([]byte{1}, 0)
	binary.LittleEndian.PutUint16(oldProto[hdrVersion:], 0x206)
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "not a bzImage"},
		{"no magic", make([]byte, 4096), "not a bzImage"},
		{"old protocol", oldProto, "need 2.08"},
		{"payload beyond end", tooLong, "outside"},
		{"xz", bzImage([]byte{0xfd, '7', 'z', 'X', 'Z', 0, 1, 2}, 64), "xz-compressed"},
		{"zstd", bzImage([]byte{0x28, 0xb5, 0x2f, 0xfd, 0}, 0), "zstd-compressed"},
		{"unknown", bzImage([]byte("garbage!"), 8), "unknown compression"},
		{"gzip but not ELF", bzImage(gz.Bytes(), 32), "not an ELF"},
		{"broken lz4", bzImage([]byte{0x02, 0x21, 0x4c, 0x18, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3}, 0), "decompress"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ExtractVmlinux(tc.in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}
	if _, err := ExtractVmlinux(nil); !errors.Is(err, ErrNotBzImage) {
		t.Fatalf("err = %v, want ErrNotBzImage", err)
	}
}

// TestExtractVmlinuxGzip round-trips a gzip payload holding a real ELF
// (this test binary).
func TestExtractVmlinuxGzip(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(want)
	zw.Close()
	// The kernel build appends the uncompressed size to the stream.
	gz.Write(binary.LittleEndian.AppendUint32(nil, uint32(len(want))))
	got, err := ExtractVmlinux(bzImage(gz.Bytes(), 100))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("extracted %d bytes, want %d", len(got), len(want))
	}
}

// FuzzPayload: the header parser never panics and only returns ranges
// inside the input.
func FuzzPayload(f *testing.F) {
	f.Add(bzImage([]byte{0x02, 0x21, 0x4c, 0x18, 1, 2, 3, 4}, 0))
	f.Add(bzImage([]byte{0x1f, 0x8b}, 700))
	f.Add(make([]byte, hdrEnd))
	f.Fuzz(func(t *testing.T, b []byte) {
		start, n, err := payload(b)
		if err == nil && (start < 0 || n <= 0 || start+n > len(b)) {
			t.Fatalf("payload %d+%d outside %d bytes", start, n, len(b))
		}
		_, _ = ExtractVmlinux(b)
	})
}
