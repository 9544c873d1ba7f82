// Package guest is the protocol between a node agent and zeitwork-init, the
// PID 1 of every microVM. Frames are newline-delimited JSON over the agent
// channel: a virtio-serial port named "zw.agent" under QEMU (no vhost-vsock
// on the development hosts), a vsock stream to port VsockPort under
// Firecracker (the host reaches it through Firecracker's hybrid vsock).
// Dial (host.go) opens the host end; Channel (channel.go) is init's end.
//
// host → guest: config (once, first), stop.
// guest → host: ready, log (one per line of the app's stdout/stderr), exit.
package guest

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
)

// PortName is the virtio-serial port name of the agent channel.
const PortName = "zw.agent"

// VsockPort is the guest vsock port init listens on when the VM has a
// vsock device and no virtio-serial port named PortName (Firecracker).
const VsockPort = 1024

// MaxFrame bounds one frame (a config with a large environment, or a long
// log line, which is truncated to fit).
const MaxFrame = 1 << 20

// maxLine is the longest app log line forwarded whole.
const maxLine = 64 << 10

// Config is everything init needs to run the app.
type Config struct {
	Entrypoint []string          `json:"entrypoint,omitempty"`
	Cmd        []string          `json:"cmd,omitempty"`
	Env        []string          `json:"env,omitempty"` // KEY=VALUE, image env then project env
	WorkDir    string            `json:"workdir,omitempty"`
	UID        uint32            `json:"uid"`
	GID        uint32            `json:"gid"`
	Groups     []uint32          `json:"groups,omitempty"`
	Hostname   string            `json:"hostname,omitempty"`
	Address    string            `json:"address,omitempty"` // CIDR, e.g. 10.100.0.2/30
	Gateway    string            `json:"gateway,omitempty"`
	MTU        int               `json:"mtu,omitempty"`
	DNS        []string          `json:"dns,omitempty"`
	Hosts      map[string]string `json:"hosts,omitempty"` // name → IP for /etc/hosts
	// StopGraceMS is how long init waits after SIGTERM before SIGKILL.
	StopGraceMS int `json:"stop_grace_ms,omitempty"`
}

// Argv is the process to run: entrypoint followed by cmd.
func (c *Config) Argv() []string {
	return append(append([]string{}, c.Entrypoint...), c.Cmd...)
}

// Frame types.
const (
	TypeConfig = "config"
	TypeStop   = "stop"
	TypeReady  = "ready"
	TypeLog    = "log"
	TypeExit   = "exit"
)

// Frame is one message on the channel.
type Frame struct {
	Type   string  `json:"type"`
	Config *Config `json:"config,omitempty"`
	Stream string  `json:"stream,omitempty"` // stdout | stderr | init
	Line   string  `json:"line,omitempty"`
	Code   *int    `json:"code,omitempty"`
	Error  string  `json:"error,omitempty"`
}

// ErrBadFrame marks a malformed or invalid frame (Reader.Next): the stream
// itself is intact and the next frame can be read.
var ErrBadFrame = errors.New("bad frame")

// Validate checks a frame received from the other side.
func (f *Frame) Validate() error {
	switch f.Type {
	case TypeConfig:
		if f.Config == nil {
			return errors.New("config frame without config")
		}
		if len(f.Config.Argv()) == 0 {
			return errors.New("config has neither entrypoint nor cmd")
		}
	case TypeExit:
		if f.Code == nil {
			return errors.New("exit frame without code")
		}
	case TypeStop, TypeReady, TypeLog:
	default:
		return fmt.Errorf("unknown frame type %q", f.Type)
	}
	return nil
}

// Reader decodes frames.
type Reader struct{ s *bufio.Scanner }

// NewReader reads frames from r.
func NewReader(r io.Reader) *Reader {
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 64<<10), MaxFrame)
	return &Reader{s: s}
}

// Next returns the next valid frame.
func (r *Reader) Next() (*Frame, error) {
	for r.s.Scan() {
		line := r.s.Bytes()
		if len(line) == 0 {
			continue
		}
		var f Frame
		if err := json.Unmarshal(line, &f); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadFrame, err)
		}
		if err := f.Validate(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadFrame, err)
		}
		return &f, nil
	}
	if err := r.s.Err(); err != nil {
		return nil, err
	}
	return nil, io.EOF
}

// Writer encodes frames; it is safe for concurrent use.
type Writer struct {
	mu sync.Mutex
	w  io.Writer
}

// NewWriter writes frames to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Send writes one frame.
func (w *Writer) Send(f *Frame) error {
	b, err := encode(f)
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	_, err = w.w.Write(b)
	return err
}

// encode is f as one line, a log line truncated to maxLine.
func encode(f *Frame) ([]byte, error) {
	if f.Type == TypeLog && len(f.Line) > maxLine {
		f.Line = f.Line[:maxLine]
	}
	b, err := json.Marshal(f)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}
