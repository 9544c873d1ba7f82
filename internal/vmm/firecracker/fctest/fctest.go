// Package fctest is a fake Firecracker for tests: Firecracker cannot run
// on the development and CI machines (no hardware KVM), so the backend in
// vmm/firecracker is tested against this server instead. It checks every
// request against Firecracker's own API description (v1.12.1, embedded),
// answers as the description says, enforces the state rules the backend
// depends on, and records each request so a test can check the sequence.
//
// cmd/fake-firecracker wraps it in a program that takes Firecracker's
// command line (and the jailer's), so the backend runs it unchanged.
//
// Beyond the schema, the fake is as strict as Firecracker: objects that
// declare properties refuse unknown fields (Firecracker deserialises with
// serde's deny_unknown_fields), path ids must match body ids, pre-boot
// resources are refused after InstanceStart, InstanceStart needs a boot
// source, snapshots need a paused VM, and a snapshot loads only into a
// fresh process.
package fctest

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"

	"github.com/getkin/kin-openapi/openapi2"
	"github.com/getkin/kin-openapi/openapi2conv"
	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
)

// SpecYAML is Firecracker's API description (Swagger 2.0), copied from
// the Firecracker v1.12.1 release.
//
//go:embed testdata/firecracker-api-v1.12.1.yaml
var SpecYAML []byte

// Version is the Firecracker version the fake claims to be.
const Version = "1.12.1"

// Spec returns the API description converted to OpenAPI 3, with every
// object schema that lists properties closed to unknown fields.
func Spec() (*openapi3.T, error) {
	var v2 openapi2.T
	if err := openapi2.UnmarshalFromData(SpecYAML, &v2); err != nil {
		return nil, fmt.Errorf("cannot parse the Firecracker API description: %w", err)
	}
	doc, err := openapi2conv.ToV3(&v2)
	if err != nil {
		return nil, fmt.Errorf("cannot convert the Firecracker API description: %w", err)
	}
	doc.Servers = nil // match any host: requests arrive over a Unix socket
	closed := false
	for _, s := range doc.Components.Schemas {
		if s.Value != nil && s.Value.Type.Is("object") && len(s.Value.Properties) > 0 {
			s.Value.AdditionalProperties = openapi3.AdditionalProperties{Has: &closed}
		}
	}
	if err := doc.Validate(context.Background()); err != nil {
		return nil, fmt.Errorf("converted Firecracker API description is invalid: %w", err)
	}
	return doc, nil
}

// Record is one request as the fake saw it.
type Record struct {
	Method string          `json:"method"`
	Path   string          `json:"path"`
	Body   json.RawMessage `json:"body,omitempty"`
	Status int             `json:"status"`
	Fault  string          `json:"fault,omitempty"`
}

// VM states, as Firecracker names them in InstanceInfo.
const (
	NotStarted = "Not started"
	Running    = "Running"
	Paused     = "Paused"
)

// Server is the fake API. Its zero value is not usable; call New.
type Server struct {
	// Root, when set, is prepended to every host path in requests (the
	// jailer's chroot: paths in requests are inside it).
	Root string
	// Log receives one JSON Record per request (NDJSON), if set.
	Log io.Writer
	// IgnoreCtrlAltDel makes SendCtrlAltDel a no-op, like a guest
	// without a keyboard driver: the backend must then kill.
	IgnoreCtrlAltDel bool
	// Guest, when set, is the guest side of the vsock: a host connection's
	// CONNECT <port> is relayed to the stream Guest returns, and closed
	// unanswered when it fails (as Firecracker does when nothing listens
	// on the port in the guest). Unset, the guest accepts every port and
	// echoes what it receives.
	Guest func(port uint32) (net.Conn, error)

	router routers.Router
	doc    *openapi3.T

	mu         sync.Mutex
	state      string
	configured map[string]bool // pre-boot resources set so far
	vsockPath  string
	vsock      net.Listener
	wg         sync.WaitGroup // vsock connections
	powerOff   chan struct{}  // closed by SendCtrlAltDel
}

// New returns a fake Firecracker in the "Not started" state.
func New() (*Server, error) {
	doc, err := Spec()
	if err != nil {
		return nil, err
	}
	r, err := legacy.NewRouter(doc)
	if err != nil {
		return nil, fmt.Errorf("cannot route the Firecracker API: %w", err)
	}
	return &Server{router: r, doc: doc, state: NotStarted, configured: map[string]bool{}, powerOff: make(chan struct{})}, nil
}

// PowerOff is closed when the guest "powers off" (SendCtrlAltDel).
func (s *Server) PowerOff() <-chan struct{} { return s.powerOff }

// State is the VM state.
func (s *Server) State() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// Close stops the vsock listener and waits for its connections.
func (s *Server) Close() error {
	s.mu.Lock()
	l := s.vsock
	s.vsock = nil
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
	s.wg.Wait()
	return nil
}

// faultError is a request the fake refuses with 400 and a fault_message.
type faultError string

func (e faultError) Error() string { return string(e) }

func faultf(format string, args ...any) error { return faultError(fmt.Sprintf(format, args...)) }

// ServeHTTP validates, applies and records one request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	rec := Record{Method: r.Method, Path: r.URL.Path}
	if len(bytes.TrimSpace(body)) > 0 {
		if json.Valid(body) {
			rec.Body = json.RawMessage(body)
		} else {
			rec.Body, _ = json.Marshal(string(body))
		}
	}
	status, out, err := s.handle(r, body)
	if err != nil {
		status = http.StatusBadRequest
		rec.Fault = err.Error()
		out, _ = json.Marshal(map[string]string{"fault_message": err.Error()})
	}
	rec.Status = status
	if verr := s.validateResponse(r, status, out); verr != nil {
		// The fake itself broke the contract: make it loud.
		status, rec.Status = http.StatusInternalServerError, http.StatusInternalServerError
		rec.Fault = "fake-firecracker answered outside the spec: " + verr.Error()
		out, _ = json.Marshal(map[string]string{"fault_message": rec.Fault})
	}
	s.record(rec)
	if out != nil {
		w.Header().Set("Content-Type", "application/json")
	}
	w.WriteHeader(status)
	w.Write(out)
}

func (s *Server) record(rec Record) {
	if s.Log == nil {
		return
	}
	b, _ := json.Marshal(rec)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Log.Write(append(b, '\n'))
}

func (s *Server) validateResponse(r *http.Request, status int, body []byte) error {
	route, params, err := s.router.FindRoute(r)
	if err != nil {
		return nil // unknown routes are answered 400 with an Error already
	}
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: r, PathParams: params, Route: route},
		Status:                 status,
		Header:                 http.Header{"Content-Type": {"application/json"}},
		Options:                &openapi3filter.Options{IncludeResponseStatus: true},
	}
	in.SetBodyBytes(body)
	return openapi3filter.ValidateResponse(r.Context(), in)
}

// handle checks a request against the spec and the state rules and
// applies it. It returns the status and body of a success.
func (s *Server) handle(r *http.Request, body []byte) (int, []byte, error) {
	route, params, err := s.router.FindRoute(r)
	if err != nil {
		return 0, nil, faultf("Invalid request method and/or path: %s %s.", r.Method, r.URL.Path)
	}
	vr := r.Clone(r.Context())
	vr.Body = io.NopCloser(bytes.NewReader(body))
	in := &openapi3filter.RequestValidationInput{
		Request: vr, PathParams: params, Route: route,
		Options: &openapi3filter.Options{MultiError: true, SkipSettingDefaults: true},
	}
	if err := openapi3filter.ValidateRequest(r.Context(), in); err != nil {
		return 0, nil, faultf("request does not match the Firecracker API: %s", oneLine(err.Error()))
	}
	var fields map[string]any
	if len(body) > 0 {
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.UseNumber()
		if err := dec.Decode(&fields); err != nil {
			return 0, nil, faultf("body is not a JSON object: %v", err)
		}
	}
	str := func(k string) string { v, _ := fields[k].(string); return v }

	s.mu.Lock()
	defer s.mu.Unlock()
	op := route.Operation.OperationID
	preBoot := map[string]string{
		"putMachineConfiguration": "machine-config", "putGuestBootSource": "boot-source",
		"putGuestDriveByID": "drive:" + params["drive_id"], "putGuestNetworkInterfaceByID": "net:" + params["iface_id"],
		"putGuestVsock": "vsock", "putCpuConfiguration": "cpu-config", "putEntropyDevice": "entropy",
		"putBalloon": "balloon", "putMmdsConfig": "mmds-config",
	}
	if res, ok := preBoot[op]; ok {
		if s.state != NotStarted {
			return 0, nil, faultError("The requested operation is not supported after starting the microVM.")
		}
		switch op {
		case "putGuestDriveByID":
			if str("drive_id") != params["drive_id"] {
				return 0, nil, faultf("The id from the path [%s] does not match the id from the body [%s]!", params["drive_id"], str("drive_id"))
			}
			if err := s.mustExist(str("path_on_host")); err != nil {
				return 0, nil, faultf("Unable to open the block device backing file: %v", err)
			}
		case "putGuestNetworkInterfaceByID":
			if str("iface_id") != params["iface_id"] {
				return 0, nil, faultf("The id from the path [%s] does not match the id from the body [%s]!", params["iface_id"], str("iface_id"))
			}
		case "putGuestBootSource":
			if err := s.mustExist(str("kernel_image_path")); err != nil {
				return 0, nil, faultf("The kernel file cannot be opened: %v", err)
			}
			if p := str("initrd_path"); p != "" {
				if err := s.mustExist(p); err != nil {
					return 0, nil, faultf("The initrd file cannot be opened: %v", err)
				}
			}
		case "putGuestVsock":
			s.vsockPath = s.Root + str("uds_path")
		case "putMachineConfiguration":
			if n, _ := fields["vcpu_count"].(json.Number).Int64(); n > 1 && n%2 == 1 {
				return 0, nil, faultError("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
			}
		}
		s.configured[res] = true
		return http.StatusNoContent, nil, nil
	}
	switch op {
	case "describeInstance":
		b, _ := json.Marshal(map[string]string{"app_name": "Firecracker", "id": "anonymous-instance", "state": s.state, "vmm_version": Version})
		return http.StatusOK, b, nil
	case "getFirecrackerVersion":
		b, _ := json.Marshal(map[string]string{"firecracker_version": Version})
		return http.StatusOK, b, nil
	case "putLogger", "putMetrics":
		return http.StatusNoContent, nil, nil
	case "createSyncAction":
		switch str("action_type") {
		case "InstanceStart":
			if s.state != NotStarted {
				return 0, nil, faultError("The requested operation is not supported after starting the microVM.")
			}
			if !s.configured["boot-source"] {
				return 0, nil, faultError("Cannot start microvm without kernel configuration.")
			}
			if err := s.listenVsock(); err != nil {
				return 0, nil, err
			}
			s.state = Running
		case "SendCtrlAltDel":
			if s.state == NotStarted {
				return 0, nil, faultError("The requested operation is not supported before starting the microVM.")
			}
			if !s.IgnoreCtrlAltDel {
				select {
				case <-s.powerOff:
				default:
					close(s.powerOff)
				}
			}
		}
		return http.StatusNoContent, nil, nil
	case "patchVm":
		if s.state == NotStarted {
			return 0, nil, faultError("The requested operation is not supported before starting the microVM.")
		}
		if str("state") == "Paused" {
			s.state = Paused
		} else {
			s.state = Running
		}
		return http.StatusNoContent, nil, nil
	case "createSnapshot":
		if s.state != Paused {
			return 0, nil, faultError("Cannot save the microVM state: the microVM is not paused.")
		}
		// The fake's "microVM state" is what it needs to come back: the
		// vsock socket path.
		state, _ := json.Marshal(fakeSnapshot{VsockPath: s.vsockPath})
		if err := os.WriteFile(s.Root+str("snapshot_path"), state, 0o600); err != nil {
			return 0, nil, faultf("Cannot create snapshot file: %v", err)
		}
		if err := os.WriteFile(s.Root+str("mem_file_path"), []byte("fake-firecracker guest memory\n"), 0o600); err != nil {
			return 0, nil, faultf("Cannot create memory file: %v", err)
		}
		return http.StatusNoContent, nil, nil
	case "loadSnapshot":
		if s.state != NotStarted || len(s.configured) > 0 {
			return 0, nil, faultError("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
		}
		mb, _ := fields["mem_backend"].(map[string]any)
		_, memFile := fields["mem_file_path"]
		if (mb == nil) == !memFile {
			return 0, nil, faultError("Exactly one of mem_file_path or mem_backend must be present.")
		}
		var snap fakeSnapshot
		b, err := os.ReadFile(s.Root + str("snapshot_path"))
		if err == nil {
			err = json.Unmarshal(b, &snap)
		}
		if err != nil {
			return 0, nil, faultf("Cannot load the microVM state: %v", err)
		}
		if mb != nil {
			if p, _ := mb["backend_path"].(string); mb["backend_type"] == "File" {
				if err := s.mustExist(p); err != nil {
					return 0, nil, faultf("Cannot open the memory file: %v", err)
				}
			}
		}
		// The vsock device comes back on its old path, which must be free.
		s.vsockPath = snap.VsockPath
		if err := s.listenVsock(); err != nil {
			return 0, nil, err
		}
		s.state = Paused
		if resume, _ := fields["resume_vm"].(bool); resume {
			s.state = Running
		}
		return http.StatusNoContent, nil, nil
	}
	return 0, nil, faultf("fake-firecracker does not implement %s %s", r.Method, r.URL.Path)
}

// fakeSnapshot is the content of the fake's snapshot_path file.
type fakeSnapshot struct {
	VsockPath string `json:"vsock_path"`
}

func (s *Server) mustExist(p string) error {
	if p == "" {
		return errors.New("empty path")
	}
	_, err := os.Stat(s.Root + p)
	return err
}

// listenVsock binds the hybrid vsock socket as Firecracker does at start:
// a host connection sends "CONNECT <port>\n" and gets "OK <host port>\n"
// once the guest (Guest, or an echo) accepted it, then the stream is
// relayed.
func (s *Server) listenVsock() error {
	if s.vsockPath == "" {
		return nil
	}
	l, err := net.Listen("unix", s.vsockPath)
	if err != nil {
		return faultf("Cannot create backend for vsock device: %v", err)
	}
	s.vsock = l
	s.wg.Add(1)
	go func() { // ends when Close closes the listener
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() { // ends when the host or the guest hangs up
				defer s.wg.Done()
				s.serveVsock(c)
			}()
		}
	}()
	return nil
}

func (s *Server) serveVsock(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	var port uint32
	if err != nil || !strings.HasPrefix(line, "CONNECT ") {
		return
	}
	if _, err := fmt.Sscanf(line, "CONNECT %d\n", &port); err != nil {
		return
	}
	if s.Guest == nil {
		fmt.Fprintf(c, "OK %d\n", 1073741824+port)
		io.Copy(c, br)
		return
	}
	g, err := s.Guest(port)
	if err != nil {
		return // the guest refused: the host sees the connection close
	}
	defer g.Close()
	fmt.Fprintf(c, "OK %d\n", 1073741824+port)
	done := make(chan struct{}, 2)
	go func() { io.Copy(g, br); done <- struct{}{} }() // ends when either side closes
	go func() { io.Copy(c, g); done <- struct{}{} }()  // ends when either side closes
	<-done                                             // one side hung up: end both
	c.Close()
	g.Close()
	<-done
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// ReadLog parses an NDJSON request log.
func ReadLog(path string) ([]Record, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []Record
	for _, line := range bytes.Split(b, []byte("\n")) {
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var r Record
		if err := json.Unmarshal(line, &r); err != nil {
			return nil, fmt.Errorf("bad log line %q: %w", line, err)
		}
		out = append(out, r)
	}
	return out, nil
}
