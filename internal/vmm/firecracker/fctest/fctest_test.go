package fctest

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type call struct {
	method, path, body string
	status             int
	fault              string // substring of fault_message when status is 400
}

func do(t *testing.T, s *Server, c call) {
	t.Helper()
	var body *strings.Reader
	if c.body != "" {
		body = strings.NewReader(c.body)
	} else {
		body = strings.NewReader("")
	}
	r := httptest.NewRequest(c.method, "http://localhost"+c.path, body)
	if c.body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	if w.Code != c.status {
		t.Fatalf("%s %s %s = %d %s, want %d", c.method, c.path, c.body, w.Code, w.Body, c.status)
	}
	if c.status == http.StatusBadRequest {
		var e struct {
			FaultMessage string `json:"fault_message"`
		}
		if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || !strings.Contains(e.FaultMessage, c.fault) {
			t.Fatalf("%s %s: fault %q (%v), want it to mention %q", c.method, c.path, e.FaultMessage, err, c.fault)
		}
	}
}

func files(t *testing.T) (kernel, disk string) {
	dir := t.TempDir()
	kernel, disk = filepath.Join(dir, "vmlinux"), filepath.Join(dir, "rootfs.ext4")
	os.WriteFile(kernel, []byte("k"), 0o644)
	os.WriteFile(disk, []byte("d"), 0o644)
	return kernel, disk
}

// TestRejectsRequestsOutsideTheSpec: the fake must refuse what Firecracker
// refuses, or a contract test built on it proves nothing.
func TestRejectsRequestsOutsideTheSpec(t *testing.T) {
	kernel, disk := files(t)
	for _, c := range []call{
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":128,"vcpus":2}`, 400, "vcpus"},                         // unknown field
		{"PUT", "/machine-config", `{"vcpu_count":"1","mem_size_mib":128}`, 400, "vcpu_count"},                            // wrong type
		{"PUT", "/machine-config", `{"vcpu_count":1}`, 400, "mem_size_mib"},                                               // missing required
		{"PUT", "/machine-config", `{"vcpu_count":0,"mem_size_mib":128}`, 400, "vcpu_count"},                              // below minimum
		{"PUT", "/machine-config", `{"vcpu_count":3,"mem_size_mib":128}`, 400, "vCPU number"},                             // Firecracker's own rule
		{"PUT", "/boot-source", `{"kernel_image_path":"` + kernel + `","bootargs":"x"}`, 400, "bootargs"},                 // misspelt
		{"PUT", "/boot-source", `{"initrd_path":"/x"}`, 400, "kernel_image_path"},                                         // missing required
		{"PUT", "/boot-source", `{"kernel_image_path":"/does/not/exist"}`, 400, "kernel file"},                            // missing file
		{"PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"` + disk + `"}`, 400, "is_root_device"},           // missing required
		{"PUT", "/drives/rootfs", `{"drive_id":"other","path_on_host":"` + disk + `","is_root_device":false}`, 400, "id"}, // path/body mismatch
		{"PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"` + disk + `","is_root_device":false,"cache_type":"None"}`, 400, "cache_type"},
		{"PUT", "/network-interfaces/eth0", `{"iface_id":"eth0"}`, 400, "host_dev_name"},
		{"PUT", "/vsock", `{"guest_cid":2,"uds_path":"/tmp/v.sock"}`, 400, "guest_cid"},   // CID 2 is the host
		{"PUT", "/vsock", `{"cid":3,"guest_cid":3,"uds_path":"/tmp/v.sock"}`, 400, "cid"}, // unknown field
		{"PUT", "/actions", `{"action_type":"Reboot"}`, 400, "action_type"},               // not in the enum
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 400, "without kernel"},     // state rule
		{"PUT", "/actions", `{"action_type":"SendCtrlAltDel"}`, 400, "before starting"},   // state rule
		{"PATCH", "/vm", `{"state":"Paused"}`, 400, "before starting"},                    // state rule
		{"PATCH", "/vm", `{"state":"Stopped"}`, 400, "state"},                             // not in the enum
		{"PUT", "/snapshot/create", `{"snapshot_path":"/tmp/s"}`, 400, "mem_file_path"},   // missing required
		{"PUT", "/snapshot/load", `{"snapshot_path":"/tmp/s","mem_backend":{"backend_type":"File"}}`, 400, "backend_path"},
		{"PUT", "/snapshot/load", `{"snapshot_path":"/tmp/s"}`, 400, "Exactly one"},
		{"POST", "/actions", `{"action_type":"InstanceStart"}`, 400, "Invalid request"}, // wrong method
		{"PUT", "/machine", `{}`, 400, "Invalid request"},                               // unknown path
		{"PUT", "/machine-config", `not json`, 400, "does not match"},
	} {
		s, err := New()
		if err != nil {
			t.Fatal(err)
		}
		do(t, s, c)
		if s.State() != NotStarted {
			t.Fatalf("%s %s changed the state to %s", c.method, c.path, s.State())
		}
	}
}

// TestStateRules walks a boot, pause, snapshot and poweroff, checking the
// rules along the way and the recorded log.
func TestStateRules(t *testing.T) {
	kernel, disk := files(t)
	dir := t.TempDir()
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var log bytes.Buffer
	s.Log = &log
	steps := []call{
		{"GET", "/", "", 200, ""},
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":256}`, 204, ""},
		{"PUT", "/boot-source", `{"kernel_image_path":"` + kernel + `","boot_args":"console=ttyS0"}`, 204, ""},
		{"PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"` + disk + `","is_root_device":false,"is_read_only":false}`, 204, ""},
		{"PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:00:00:00:00:01"}`, 204, ""},
		{"PUT", "/vsock", `{"guest_cid":3,"uds_path":"` + dir + `/v.sock"}`, 204, ""},
		{"PUT", "/snapshot/create", `{"snapshot_path":"` + dir + `/s","mem_file_path":"` + dir + `/m"}`, 400, "not paused"},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 204, ""},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 400, "after starting"},
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":128}`, 400, "after starting"},
		{"PUT", "/snapshot/load", `{"snapshot_path":"` + dir + `/s","mem_backend":{"backend_type":"File","backend_path":"` + dir + `/m"}}`, 400, "not allowed"},
		{"PUT", "/snapshot/create", `{"snapshot_path":"` + dir + `/s","mem_file_path":"` + dir + `/m"}`, 400, "not paused"},
		{"PATCH", "/vm", `{"state":"Paused"}`, 204, ""},
		{"PUT", "/snapshot/create", `{"snapshot_type":"Full","snapshot_path":"` + dir + `/s","mem_file_path":"` + dir + `/m"}`, 204, ""},
		{"PATCH", "/vm", `{"state":"Resumed"}`, 204, ""},
		{"PUT", "/actions", `{"action_type":"SendCtrlAltDel"}`, 204, ""},
	}
	for _, c := range steps {
		do(t, s, c)
	}
	select {
	case <-s.PowerOff():
	default:
		t.Fatal("SendCtrlAltDel did not power off")
	}
	if _, err := os.Stat(filepath.Join(dir, "v.sock")); err != nil {
		t.Fatalf("InstanceStart did not bind the vsock socket: %v", err)
	}
	p := filepath.Join(t.TempDir(), "log.ndjson")
	os.WriteFile(p, log.Bytes(), 0o644)
	recs, err := ReadLog(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != len(steps) {
		t.Fatalf("%d records, want %d", len(recs), len(steps))
	}
	for i, r := range recs {
		if r.Method != steps[i].method || r.Path != steps[i].path || r.Status != steps[i].status {
			t.Fatalf("record %d = %+v, want %+v", i, r, steps[i])
		}
	}

	// A fresh process loads the snapshot; a second load is refused.
	s2, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	os.Remove(filepath.Join(dir, "v.sock"))
	load := call{"PUT", "/snapshot/load", `{"snapshot_path":"` + dir + `/s","mem_backend":{"backend_type":"File","backend_path":"` + dir + `/m"},"resume_vm":true}`, 204, ""}
	do(t, s2, load)
	if s2.State() != Running {
		t.Fatalf("state after load with resume_vm = %s", s2.State())
	}
	load.status, load.fault = 400, "not allowed"
	do(t, s2, load)
}

// TestSpecIsClosed: the conversion kept the schemas and closed them.
func TestSpecIsClosed(t *testing.T) {
	doc, err := Spec()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"MachineConfiguration", "BootSource", "Drive", "NetworkInterface", "Vsock", "InstanceActionInfo", "SnapshotCreateParams", "SnapshotLoadParams", "Vm"} {
		s := doc.Components.Schemas[name]
		if s == nil || s.Value.AdditionalProperties.Has == nil || *s.Value.AdditionalProperties.Has {
			t.Errorf("schema %s is missing or open", name)
		}
	}
}
