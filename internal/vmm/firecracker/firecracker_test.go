package firecracker

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/guest"
	"github.com/zeitwork/zeitwork/internal/vmm"
	"github.com/zeitwork/zeitwork/internal/vmm/firecracker/fctest"
	"github.com/zeitwork/zeitwork/internal/vmm/vmmtest"
)

// fakeBin is cmd/fake-firecracker, built once for the package's tests.
var fakeBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "fake-firecracker-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fakeBin, err = fctest.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func backend(t *testing.T) *Firecracker {
	t.Helper()
	f, err := New(Config{Bin: fakeBin})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// testSpec returns a spec with a kernel, initrd and base disk that exist.
func testSpec(t *testing.T) vmm.Spec {
	t.Helper()
	in := t.TempDir()
	files := map[string]string{"vmlinux": "\x7fELF kernel", "initrd.cpio": "initrd", "base.ext4": "base image"}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(in, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A sparse tail: the copy must keep the size.
	if err := os.Truncate(filepath.Join(in, "base.ext4"), 64<<20); err != nil {
		t.Fatal(err)
	}
	return vmm.Spec{
		ID: "vm-1", VCPUs: 2, MemoryMiB: 256,
		Kernel: filepath.Join(in, "vmlinux"), Initrd: filepath.Join(in, "initrd.cpio"), Cmdline: "zw.test=1",
		RootDisk: filepath.Join(in, "base.ext4"), Tap: "zwtap0", MAC: "02:5a:00:00:00:01", Dir: t.TempDir(),
	}
}

// requests reads what the fake saw; every request must have been
// accepted.
func requests(t *testing.T, logDir string) []fctest.Record {
	t.Helper()
	recs, err := fctest.ReadLog(filepath.Join(logDir, "fake-firecracker.ndjson"))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.Status/100 != 2 {
			t.Fatalf("fake firecracker refused %s %s %s: %d %s", r.Method, r.Path, r.Body, r.Status, r.Fault)
		}
	}
	return recs
}

// sequence is "METHOD /path" per record, with the action or state for
// /actions and /vm.
func sequence(recs []fctest.Record) []string {
	var out []string
	for _, r := range recs {
		s := r.Method + " " + r.Path
		var b map[string]any
		json.Unmarshal(r.Body, &b)
		if v, ok := b["action_type"]; ok {
			s += " " + v.(string)
		}
		if v, ok := b["state"]; ok && r.Path == "/vm" {
			s += " " + v.(string)
		}
		out = append(out, s)
	}
	return out
}

func wantSequence(t *testing.T, recs []fctest.Record, want ...string) {
	t.Helper()
	if got := sequence(recs); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("request sequence:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

func body(t *testing.T, r fctest.Record) map[string]any {
	t.Helper()
	var b map[string]any
	if err := json.Unmarshal(r.Body, &b); err != nil {
		t.Fatalf("%s %s body %s: %v", r.Method, r.Path, r.Body, err)
	}
	return b
}

var bootSequence = []string{
	"PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs",
	"PUT /network-interfaces/eth0", "PUT /vsock", "PUT /actions InstanceStart",
}

func waitDone(t *testing.T, m vmm.Machine, within time.Duration) {
	t.Helper()
	select {
	case <-m.Done():
	case <-time.After(within):
		t.Fatalf("firecracker pid %d still running after %s", m.PID(), within)
	}
}

// TestContract runs the vmm contract against the fake Firecracker, with
// vmmtest.PlayInit as the guest's init on the port the fake relays the
// guest vsock port to.
func TestContract(t *testing.T) {
	guestDir := t.TempDir()
	t.Setenv("FAKE_FIRECRACKER_GUEST_VSOCK", guestDir)
	vmmtest.Run(t, vmmtest.Harness{
		New:  func(t *testing.T) vmm.VMM { return backend(t) },
		Spec: testSpec,
		Guest: func(t *testing.T, m vmm.Machine) {
			l, err := net.Listen("unix", filepath.Join(guestDir, fmt.Sprintf("%d.sock", guest.VsockPort)))
			if err != nil {
				t.Fatal(err)
			}
			vmmtest.PlayInit(t, l)
		},
		BootTimeout: 10 * time.Second,
	})
}

// TestBoot: Start configures the VM in Firecracker's order with what the
// spec asks for, copies the disk, and the agent socket is the vsock.
func TestBoot(t *testing.T) {
	spec := testSpec(t)
	m, err := backend(t).Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	recs := requests(t, spec.Dir)
	wantSequence(t, recs, bootSequence...)

	if b := body(t, recs[0]); b["vcpu_count"] != 2.0 || b["mem_size_mib"] != 256.0 {
		t.Errorf("machine-config %v", b)
	}
	b := body(t, recs[1])
	if b["kernel_image_path"] != spec.Kernel || b["initrd_path"] != spec.Initrd ||
		!strings.Contains(b["boot_args"].(string), "console=ttyS0") || !strings.HasSuffix(b["boot_args"].(string), " zw.test=1") {
		t.Errorf("boot-source %v", b)
	}
	b = body(t, recs[2])
	disk := filepath.Join(spec.Dir, "rootfs.ext4")
	if b["path_on_host"] != disk || b["is_root_device"] != false || b["is_read_only"] != false {
		t.Errorf("drive %v", b)
	}
	if b := body(t, recs[3]); b["host_dev_name"] != spec.Tap || b["guest_mac"] != spec.MAC {
		t.Errorf("network interface %v", b)
	}
	b = body(t, recs[4])
	fm := m.(*Machine)
	if b["guest_cid"] != 3.0 || b["uds_path"] != fm.VsockPath() || filepath.Dir(fm.VsockPath()) != spec.Dir {
		t.Errorf("vsock %v, vsock socket %s", b, fm.VsockPath())
	}
	base, _ := os.ReadFile(spec.RootDisk)
	copied, err := os.ReadFile(disk)
	if err != nil || !bytes.Equal(base, copied) {
		t.Fatalf("root disk copy differs from the base image (%v)", err)
	}

	// The hybrid vsock handshake, then the (echoing) guest.
	c, err := fm.DialVsock(t.Context(), 7)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "ping\n")
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping\n" {
		t.Fatalf("agent channel echo %q %v", buf, err)
	}
	c.Close()

	if err := m.Kill(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, m, time.Second)
}

// TestBootFromBzImage: handed a bzImage (as the agent hands every
// backend), Start boots the ELF extracted from it.
func TestBootFromBzImage(t *testing.T) {
	spec := testSpec(t)
	elfBytes, err := os.ReadFile(fakeBin) // any x86-64 ELF executable
	if err != nil {
		t.Fatal(err)
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(elfBytes)
	zw.Close()
	bz := make([]byte, 1024+gz.Len()) // boot sector + 1 setup sector, payload at 0
	bz[0x1f1] = 1
	copy(bz[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(bz[0x206:], 0x20f)
	binary.LittleEndian.PutUint32(bz[0x24c:], uint32(gz.Len()))
	copy(bz[1024:], gz.Bytes())
	spec.Kernel = filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(spec.Kernel, bz, 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := backend(t).Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	recs := requests(t, spec.Dir)
	want := filepath.Join(filepath.Dir(spec.Kernel), "vmlinux")
	if b := body(t, recs[1]); b["kernel_image_path"] != want {
		t.Fatalf("kernel_image_path %v, want the extracted %s", b["kernel_image_path"], want)
	}
	if got, _ := os.ReadFile(want); !bytes.Equal(got, elfBytes) {
		t.Fatal("extracted kernel differs from the ELF in the bzImage")
	}
}

// TestBootWithoutNetwork leaves the network interface out.
func TestBootWithoutNetwork(t *testing.T) {
	spec := testSpec(t)
	spec.Tap, spec.MAC = "", ""
	m, err := backend(t).Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	wantSequence(t, requests(t, spec.Dir), "PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs", "PUT /vsock", "PUT /actions InstanceStart")
}

// TestBootWithDrives attaches a builder's extra drives after the root
// disk, in order, read-only where asked, each request valid against the
// API description.
func TestBootWithDrives(t *testing.T) {
	spec := testSpec(t)
	for _, id := range []string{"zw-cache", "zw-source"} {
		p := filepath.Join(spec.Dir, id+".img")
		if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
		spec.Drives = append(spec.Drives, vmm.Drive{ID: id, Path: p, ReadOnly: id == "zw-source"})
	}
	m, err := backend(t).Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	recs := requests(t, spec.Dir)
	wantSequence(t, recs, "PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs", "PUT /drives/zw-cache", "PUT /drives/zw-source",
		"PUT /network-interfaces/eth0", "PUT /vsock", "PUT /actions InstanceStart")
	src := body(t, recs[4])
	if src["is_read_only"] != true || src["is_root_device"] != false || src["path_on_host"] != spec.Drives[1].Path {
		t.Fatalf("source drive: %v", src)
	}
	spec.Drives = append(spec.Drives, vmm.Drive{ID: "Bad ID", Path: spec.Drives[0].Path})
	if _, err := backend(t).Start(t.Context(), spec); err == nil || !strings.Contains(err.Error(), "drive id") {
		t.Fatalf("bad drive id: %v", err)
	}
}

// TestStopCtrlAltDel: a graceful stop sends Ctrl-Alt-Del and firecracker
// exits by itself, well before the kill timeout.
func TestStopCtrlAltDel(t *testing.T) {
	spec := testSpec(t)
	m, err := backend(t).Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	start := time.Now()
	if err := m.(*Machine).Stop(t.Context(), 20*time.Second); err != nil {
		t.Fatal(err)
	}
	waitDone(t, m, 100*time.Millisecond)
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("stop took %s: killed at the timeout instead of a guest poweroff", d)
	}
	wantSequence(t, requests(t, spec.Dir), append(bootSequence, "PUT /actions SendCtrlAltDel")...)
}

// TestStopKillsAfterTimeout: a guest that ignores Ctrl-Alt-Del is killed.
func TestStopKillsAfterTimeout(t *testing.T) {
	t.Setenv("FAKE_FIRECRACKER_IGNORE_CTRL_ALT_DEL", "1")
	spec := testSpec(t)
	m, err := backend(t).Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	start := time.Now()
	if err := m.(*Machine).Stop(t.Context(), 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	waitDone(t, m, 100*time.Millisecond)
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("stopped after %s, before the timeout: Ctrl-Alt-Del was not ignored", d)
	}
	wantSequence(t, requests(t, spec.Dir), append(bootSequence, "PUT /actions SendCtrlAltDel")...)
}

// TestAdoptAfterAgentRestart: beyond the contract (same pid, ErrGone; see
// TestContract), the adopted machine checks the process with GET / and
// drives it over the same API socket.
func TestAdoptAfterAgentRestart(t *testing.T) {
	spec := testSpec(t)
	m, err := backend(t).Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	a, err := backend(t).Adopt(t.Context(), spec.Dir)
	if err != nil {
		t.Fatal(err)
	}
	as, ms := a.(*Machine).VsockPath(), m.(*Machine).VsockPath()
	if a.PID() != m.PID() || as != ms || a.ID() != filepath.Base(spec.Dir) {
		t.Fatalf("adopted pid %d socket %s, started pid %d socket %s", a.PID(), as, m.PID(), ms)
	}
	if err := a.(*Machine).Pause(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := a.Kill(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, m, 5*time.Second)
	wantSequence(t, requests(t, spec.Dir), append(bootSequence, "GET /", "PATCH /vm Paused")...)
}

// TestSnapshotAndRestore: pause → create → resume, then a fresh process
// loads the snapshot resumed and the agent channel works again.
func TestSnapshotAndRestore(t *testing.T) {
	spec := testSpec(t)
	f := backend(t)
	m, err := f.Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	snap := Snapshot{State: filepath.Join(spec.Dir, "snap.state"), Memory: filepath.Join(spec.Dir, "snap.mem")}
	if err := m.(*Machine).Snapshot(t.Context(), snap); err != nil {
		t.Fatal(err)
	}
	recs := requests(t, spec.Dir)
	wantSequence(t, recs, append(bootSequence, "PATCH /vm Paused", "PUT /snapshot/create", "PATCH /vm Resumed")...)
	if b := body(t, recs[len(recs)-2]); b["snapshot_type"] != "Full" || b["snapshot_path"] != snap.State || b["mem_file_path"] != snap.Memory {
		t.Fatalf("snapshot/create %v", b)
	}
	if err := m.Kill(); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(spec.Dir, "fake-firecracker.ndjson"))

	r, err := f.Restore(t.Context(), spec.ID, spec.Dir, snap)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Kill()
	recs = requests(t, spec.Dir)
	wantSequence(t, recs, "PUT /snapshot/load")
	b := body(t, recs[0])
	mb, _ := b["mem_backend"].(map[string]any)
	if b["snapshot_path"] != snap.State || b["resume_vm"] != true || mb["backend_type"] != "File" || mb["backend_path"] != snap.Memory {
		t.Fatalf("snapshot/load %v", b)
	}
	c, err := r.DialAgent(t.Context())
	if err != nil {
		t.Fatalf("agent channel after restore: %v", err)
	}
	c.Close()
	// A loaded VM takes no boot configuration.
	err = r.configure(t.Context(), []apiCall{{"PUT", "/machine-config", machineConfig{VCPUCount: 1, MemSizeMiB: 128}}}, false)
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusBadRequest || !strings.Contains(err.Error(), "after starting") {
		t.Fatalf("machine-config after load = %v", err)
	}
}

// TestAPIErrorsAreClear: Firecracker's fault_message reaches the caller
// as an APIError, and a start that Firecracker refuses leaves no process
// behind. (Missing files are refused before anything is spawned; see the
// contract's InvalidSpec.)
func TestAPIErrorsAreClear(t *testing.T) {
	spec := testSpec(t)
	spec.VCPUs = 33 // the API allows 1 to 32
	_, err := backend(t).Start(t.Context(), spec)
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusBadRequest || apiErr.Path != "/machine-config" ||
		!strings.Contains(err.Error(), "vcpu_count") {
		t.Fatalf("Start with 33 vCPUs = %v", err)
	}
	b, _ := os.ReadFile(filepath.Join(spec.Dir, "vmm.pid"))
	var pid int
	fmt.Sscan(string(b), &pid)
	if pid == 0 {
		t.Fatal("no pid file")
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
		if cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(cmd), "--api-sock") {
			t.Fatalf("firecracker pid %d still runs after a failed start", pid)
		}
	}
	m, err := backend(t).Start(t.Context(), testSpec(t))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	err = m.(*Machine).api.do(t.Context(), "PUT", "/snapshot/create", snapshotCreate{SnapshotType: "Full", SnapshotPath: "/tmp/x", MemFilePath: "/tmp/y"}, nil)
	if !errors.As(err, &apiErr) || !strings.Contains(apiErr.Fault, "not paused") {
		t.Fatalf("snapshot of a running VM = %v", err)
	}
}

// TestJailer: through the jailer, files move into the chroot and the API
// sees chroot paths.
func TestJailer(t *testing.T) {
	base := t.TempDir()
	f, err := New(Config{Bin: fakeBin, Jailer: &JailerConfig{Bin: fakeBin, UID: 1234, GID: 1234, ChrootBaseDir: base}})
	if err != nil {
		t.Fatal(err)
	}
	spec := testSpec(t)
	m, err := f.Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	root := filepath.Join(base, "firecracker", spec.ID, "root")
	recs := requests(t, filepath.Join(root, "run"))
	wantSequence(t, recs, bootSequence...)
	if b := body(t, recs[1]); b["kernel_image_path"] != "/vmlinux" || b["initrd_path"] != "/initrd" {
		t.Fatalf("boot-source in the jail %v", b)
	}
	if b := body(t, recs[2]); b["path_on_host"] != "/rootfs.ext4" {
		t.Fatalf("drive in the jail %v", b)
	}
	st, err := os.Stat(filepath.Join(root, "rootfs.ext4"))
	if err != nil {
		t.Fatal(err)
	}
	if sys := st.Sys().(*syscall.Stat_t); sys.Uid != 1234 || sys.Gid != 1234 {
		t.Fatalf("root disk in the jail owned by %d:%d, want the jailed user", sys.Uid, sys.Gid)
	}
	if p := m.(*Machine).VsockPath(); p != filepath.Join(root, "v.sock") {
		t.Fatalf("vsock socket %s", p)
	}
	a, err := f.Adopt(context.Background(), spec.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if a.PID() != m.PID() {
		t.Fatalf("adopted pid %d, started %d", a.PID(), m.PID())
	}
}

// TestNewChecksBinaries: a missing binary is a clear error at start.
func TestNewChecksBinaries(t *testing.T) {
	if _, err := New(Config{Bin: "/nonexistent/firecracker"}); err == nil || !strings.Contains(err.Error(), "FIRECRACKER_BIN") {
		t.Fatalf("New with a missing firecracker = %v", err)
	}
	if _, err := New(Config{Bin: fakeBin, Jailer: &JailerConfig{Bin: "/nonexistent/jailer"}}); err == nil || !strings.Contains(err.Error(), "JAILER_BIN") {
		t.Fatalf("New with a missing jailer = %v", err)
	}
}

// TestAgentChannelOverVsock: what the contract (TestContract: ready →
// config → log, and an agent restart through Adopt) leaves out of the
// hybrid vsock: before init listens the CONNECT is refused and guest.Dial
// keeps retrying until its context ends; a connection opened by the next
// agent replaces the previous one, which init's channel closes.
func TestAgentChannelOverVsock(t *testing.T) {
	guestDir := t.TempDir()
	t.Setenv("FAKE_FIRECRACKER_GUEST_VSOCK", guestDir)
	spec := testSpec(t)
	m, err := backend(t).Start(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()

	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	if c, err := guest.Dial(ctx, m.DialAgent); err == nil {
		c.Close()
		t.Fatal("DialAgent succeeded with no listener in the guest")
	}
	cancel()

	l, err := net.Listen("unix", filepath.Join(guestDir, fmt.Sprintf("%d.sock", guest.VsockPort)))
	if err != nil {
		t.Fatal(err)
	}
	vmmtest.PlayInit(t, l)
	ctx, cancel = context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c1, err := guest.Dial(ctx, m.DialAgent)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	c1.SetDeadline(time.Now().Add(10 * time.Second))
	r1 := guest.NewReader(c1)
	if f, err := r1.Next(); err != nil || f.Type != guest.TypeReady {
		t.Fatalf("first connection: %+v %v, want ready", f, err)
	}
	c2, err := guest.Dial(ctx, m.DialAgent)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	// Without a config yet, the new connection is greeted with ready too.
	if f, err := guest.NewReader(c2).Next(); err != nil || f.Type != guest.TypeReady {
		t.Fatalf("second connection: %+v %v, want ready", f, err)
	}
	if f, err := r1.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("first connection after the second one: %+v %v, want EOF", f, err)
	}
}
