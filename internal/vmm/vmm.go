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
	"net"
)

// Spec describes one microVM.
type Spec struct {
	ID        string
	VCPUs     int
	MemoryMiB int
	Kernel    string // bzImage (QEMU) or ELF vmlinux (Firecracker)
	Initrd    string
	Cmdline   string // extra kernel arguments
	// RootDisk is the base ext4 image; it is never written. Each VM boots a
	// copy-on-write overlay of it in Dir.
	RootDisk string
	Tap      string // host tap device; empty = no network
	MAC      string
	// Dir is the machine's state directory (overlay disk, sockets, pid,
	// console log). It must exist.
	Dir string
}

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
