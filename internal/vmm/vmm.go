// Package vmm is the small interface between the node agent and a virtual
// machine monitor. Two backends implement it: vmm/qemu (QEMU's microvm
// machine; KVM where the host has VMX/SVM, software emulation otherwise —
// what every test boots) and vmm/firecracker (production on KVM hosts).
//
// A machine's process runs in its own session so it outlives the agent;
// everything needed to re-adopt it after an agent restart (pid, sockets)
// lives in its state directory. The host end of the guest agent channel is
// Machine.DialAgent.
package vmm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
)

// Spec describes one microVM.
type Spec struct {
	ID        string
	VCPUs     int
	MemoryMiB int
	// Kernel is a bzImage or its ELF vmlinux: QEMU boots either (the ELF
	// through its PVH entry), Firecracker boots the ELF and extracts it
	// from a bzImage.
	Kernel  string
	Initrd  string
	Cmdline string // extra kernel arguments
	// RootDisk is the base ext4 image; it is never written. Each VM boots a
	// copy-on-write overlay of it in Dir.
	RootDisk string
	// Drives are extra raw disks, attached after the root disk in order
	// (the guest sees vdb, vdc, … and each drive's ID as its serial under
	// QEMU). They are used in place, not copied: the builder's layer
	// cache, its source tree and its output.
	Drives []Drive
	Tap    string // host tap device; empty = no network
	MAC    string
	// Dir is the machine's state directory (overlay disk, sockets, pid,
	// console log). It must exist.
	Dir string
}

// Drive is one extra raw disk.
type Drive struct {
	ID       string // [a-z0-9-]{1,20}; the serial the guest sees under QEMU
	Path     string
	ReadOnly bool
}

// Defaults of a Spec that leaves them unset.
const (
	DefaultVCPUs     = 1
	DefaultMemoryMiB = 128
)

// WithDefaults returns s with unset vCPUs and memory set to the defaults.
func (s Spec) WithDefaults() Spec {
	if s.VCPUs <= 0 {
		s.VCPUs = DefaultVCPUs
	}
	if s.MemoryMiB <= 0 {
		s.MemoryMiB = DefaultMemoryMiB
	}
	return s
}

// Validate checks, before anything is spawned, that the files the spec
// names exist: the kernel, the initrd (when set) and the root disk must be
// regular files, Dir a directory. Errors name the field and the path and
// wrap the fs error (errors.Is(err, fs.ErrNotExist) for a missing file).
func (s Spec) Validate() error {
	if s.ID == "" {
		return errors.New("machine spec has no ID")
	}
	files := []struct{ what, path string }{{"kernel", s.Kernel}, {"initrd", s.Initrd}, {"root disk", s.RootDisk}}
	for _, f := range files {
		if f.path == "" {
			if f.what == "initrd" {
				continue
			}
			return fmt.Errorf("machine %s: no %s in the spec", s.ID, f.what)
		}
		st, err := os.Stat(f.path)
		if err != nil {
			return fmt.Errorf("machine %s: %s: %w", s.ID, f.what, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("machine %s: %s %s is not a regular file", s.ID, f.what, f.path)
		}
	}
	for _, d := range s.Drives {
		if !driveIDRE.MatchString(d.ID) || d.ID == "rootfs" {
			return fmt.Errorf("machine %s: drive id %q", s.ID, d.ID)
		}
		st, err := os.Stat(d.Path)
		if err != nil {
			return fmt.Errorf("machine %s: drive %s: %w", s.ID, d.ID, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("machine %s: drive %s: %s is not a regular file", s.ID, d.ID, d.Path)
		}
	}
	if st, err := os.Stat(s.Dir); err != nil {
		return fmt.Errorf("machine %s: state directory: %w", s.ID, err)
	} else if !st.IsDir() {
		return fmt.Errorf("machine %s: state directory %s is not a directory", s.ID, s.Dir)
	}
	return nil
}

var driveIDRE = regexp.MustCompile(`^[a-z0-9-]{1,20}$`)

// Machine is a running microVM.
type Machine interface {
	ID() string
	PID() int
	// DialAgent opens one connection to the guest agent channel (see
	// package guest): QEMU's virtio-serial chardev socket, or Firecracker's
	// hybrid vsock to guest.VsockPort. It fails while the guest is not
	// listening yet; guest.Dial retries it.
	DialAgent(ctx context.Context) (net.Conn, error)
	// Done is closed when the VMM process has exited.
	Done() <-chan struct{}
	// Kill stops the VMM process at once.
	Kill() error
}

// VMM starts and re-adopts machines.
type VMM interface {
	Name() string
	Start(ctx context.Context, spec Spec) (Machine, error)
	// Adopt re-attaches to a machine started earlier (possibly by another
	// agent process) from its state directory. It returns ErrGone when
	// the machine is no longer running.
	Adopt(ctx context.Context, dir string) (Machine, error)
}

// ErrGone means a machine's process no longer exists.
var ErrGone = errors.New("machine is not running")
