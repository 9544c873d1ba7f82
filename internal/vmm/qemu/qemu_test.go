package qemu

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/guest"
	"github.com/zeitwork/zeitwork/internal/guestkernel"
	"github.com/zeitwork/zeitwork/internal/vmm"
	"github.com/zeitwork/zeitwork/internal/vmm/vmmtest"
)

var (
	kitDir  string
	kitOnce sync.Once
	kit     *vmmtest.Kit
	kitErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if kitDir != "" {
		os.RemoveAll(kitDir)
	}
	os.Exit(code)
}

// testKit builds zeitwork-init and the suite's app and fetches the guest
// kernel, once for the package's tests.
func testKit(t *testing.T) *vmmtest.Kit {
	t.Helper()
	kitOnce.Do(func() {
		if kitDir, kitErr = os.MkdirTemp("", "qemu-test-kit-"); kitErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		kit, kitErr = vmmtest.BuildKit(ctx, kitDir)
	})
	if kitErr != nil {
		t.Fatal(kitErr)
	}
	return kit
}

func backend(t *testing.T) *QEMU {
	t.Helper()
	q, err := New()
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// TestContract runs the vmm contract against real microVMs: one boot of
// the Debian kernel with this tree's zeitwork-init (see package vmmtest).
func TestContract(t *testing.T) {
	k := testKit(t)
	t.Logf("accelerator: %s", backend(t).Accel)
	var dirs []string
	vmmtest.Run(t, vmmtest.Harness{
		New: func(t *testing.T) vmm.VMM { return backend(t) },
		Spec: func(t *testing.T) vmm.Spec {
			dirs = append(dirs, t.TempDir())
			return vmm.Spec{ID: "contract", Kernel: k.Kernel.BzImage, Initrd: k.Kernel.Initrd,
				RootDisk: k.RootDisk, Dir: dirs[len(dirs)-1], MemoryMiB: 128}
		},
	})
	// A killed QEMU cannot remove its agent socket; the backend does.
	for _, d := range dirs {
		sock, _ := socketPath(d)
		if _, err := os.Stat(sock); err == nil {
			t.Errorf("agent socket %s left behind", sock)
		}
	}
}

// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY, the 32-bit PVH entry
// point QEMU's -kernel looks for in an ELF (hw/i386/x86.c).
const xenElfnotePhys32Entry = 18

// pvhEntry returns the PVH entry point from an ELF kernel's Xen notes.
func pvhEntry(path string) (uint64, error) {
	f, err := elf.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			return 0, err
		}
		for len(b) >= 12 {
			namesz, descsz, typ := binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:]), binary.LittleEndian.Uint32(b[8:])
			align4 := func(n uint32) int { return int((n + 3) &^ 3) }
			if 12+align4(namesz)+align4(descsz) > len(b) {
				break
			}
			name := b[12 : 12+namesz]
			desc := b[12+align4(namesz) : 12+align4(namesz)+int(descsz)]
			if string(bytes.TrimRight(name, "\x00")) == "Xen" && typ == xenElfnotePhys32Entry && len(desc) >= 4 {
				if len(desc) >= 8 {
					return binary.LittleEndian.Uint64(desc), nil
				}
				return uint64(binary.LittleEndian.Uint32(desc)), nil
			}
			b = b[12+align4(namesz)+align4(descsz):]
		}
	}
	return 0, fmt.Errorf("%s has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)", path)
}

// TestBootsExtractedVmlinux: the ELF vmlinux that guestkernel extracts from
// the bzImage (what Firecracker boots) is a working kernel: QEMU microvm
// boots it through its PVH entry with the same initramfs, and zeitwork-init
// reports ready on the agent channel. One boot, killed once ready.
func TestBootsExtractedVmlinux(t *testing.T) {
	k := testKit(t)
	vmlinux, err := guestkernel.EnsureVmlinux(k.Kernel.BzImage)
	if err != nil {
		t.Fatal(err)
	}
	entry, err := pvhEntry(vmlinux)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: PVH entry %#x", vmlinux, entry)
	q := backend(t)
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	dir := t.TempDir()
	start := time.Now()
	m, err := q.Start(ctx, vmm.Spec{ID: "vmlinux", Kernel: vmlinux, Initrd: k.Kernel.Initrd, RootDisk: k.RootDisk, Dir: dir, MemoryMiB: 128})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", m.PID())); !bytes.Contains(cmd, []byte("\x00-kernel\x00"+vmlinux+"\x00")) {
		t.Fatalf("qemu was not started with -kernel %s: %q", vmlinux, cmd)
	}
	conn, err := guest.Dial(ctx, m.DialAgent)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	go func() { <-ctx.Done(); conn.Close() }()
	f, err := guest.NewReader(conn).Next()
	if err != nil || f.Type != guest.TypeReady {
		console, _ := os.ReadFile(dir + "/console.log")
		qlog, _ := os.ReadFile(dir + "/qemu.log")
		t.Fatalf("agent channel: %+v %v\nqemu.log:\n%s\nconsole:\n%s", f, err, qlog, console)
	}
	t.Logf("%s: zeitwork-init ready %s after qemu started (%s)", vmlinux, time.Since(start).Round(time.Millisecond), q.Accel)
	// Every QEMU thread (vCPUs included) runs at the backend's nice value.
	if nice, err := vmmtest.ThreadNice(m.PID()); err != nil || slices.ContainsFunc(nice, func(n int) bool { return n != q.Nice }) {
		t.Errorf("qemu threads run at nice %v (%v), want all %d", nice, err, q.Nice)
	}
	if err := m.Kill(); err != nil {
		t.Fatal(err)
	}
}

// TestDetectAccel: ZEITWORK_QEMU_ACCEL=tcg forces emulation, and only an
// emulated guest gets the TSC frequency on its command line (it hangs at
// calibration without it).
func TestDetectAccel(t *testing.T) {
	t.Setenv("ZEITWORK_QEMU_ACCEL", "tcg")
	if a := DetectAccel(); a != TCG {
		t.Fatalf("DetectAccel with ZEITWORK_QEMU_ACCEL=tcg = %s", a)
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		t.Setenv("ZEITWORK_QEMU_ACCEL", "")
		if a := DetectAccel(); a != TCG {
			t.Fatalf("DetectAccel on a KVM-PVM host = %s, want tcg", a)
		}
	}
	tcg := (&QEMU{Accel: TCG, cpuKHz: 2100000}).Cmdline("zw.x=1")
	if !strings.Contains(tcg, " tsc_early_khz=2100000 tsc=reliable") || !strings.HasSuffix(tcg, " zw.x=1") {
		t.Fatalf("TCG cmdline %q", tcg)
	}
	if kvm := (&QEMU{Accel: KVM, cpuKHz: 2100000}).Cmdline(""); strings.Contains(kvm, "tsc_early_khz") {
		t.Fatalf("KVM cmdline %q", kvm)
	}
}
