package topology

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// run runs a command and names it in its error.
func run(name string, args ...string) error {
	return runIn(nil, name, args...)
}

func runIn(stdin []byte, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// ipn runs `ip -n ns args…`.
func ipn(ns string, args ...string) error {
	return run("ip", append([]string{"-n", ns}, args...)...)
}

// inNS runs a command inside a namespace.
func inNS(ns string, name string, args ...string) error {
	return run("ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

// addNS creates a namespace with its loopback up.
func addNS(ns string) error {
	if err := run("ip", "netns", "add", ns); err != nil {
		return err
	}
	return ipn(ns, "link", "set", "lo", "up")
}

// veth creates a pair: a in nsA (or the root namespace when nsA is ""),
// b in nsB.
func veth(nsA, a, nsB, b string) error {
	args := []string{"link", "add", a, "type", "veth", "peer", "name", b, "netns", nsB}
	if nsA == "" {
		return run("ip", args...)
	}
	return ipn(nsA, args...)
}

// nsPIDs lists the processes inside a namespace.
func nsPIDs(ns string) []int {
	out, _ := exec.Command("ip", "netns", "pids", ns).Output()
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if p, err := strconv.Atoi(f); err == nil && p > 1 {
			pids = append(pids, p)
		}
	}
	return pids
}

// Cleanup removes whatever a previous run left with the topology's
// prefix: processes inside its namespaces (microVMs included), the
// namespaces, the management link and the per-namespace resolv.conf
// files. It is safe to call when nothing is left.
func Cleanup() error {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return fmt.Errorf("cannot list network namespaces: %w", err)
	}
	var stale []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], Prefix) {
			stale = append(stale, f[0])
		}
	}
	for _, ns := range stale {
		for _, p := range nsPIDs(ns) {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
	}
	// Give killed processes a moment to release their namespaces.
	for _, ns := range stale {
		for i := 0; i < 50 && len(nsPIDs(ns)) > 0; i++ {
			time.Sleep(20 * time.Millisecond)
		}
	}
	var errs []error
	for _, ns := range stale {
		if err := run("ip", "netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
		_ = os.RemoveAll(filepath.Join("/etc/netns", ns))
	}
	if exec.Command("ip", "link", "show", Prefix+"mgmt").Run() == nil {
		if err := run("ip", "link", "del", Prefix+"mgmt"); err != nil {
			errs = append(errs, err)
		}
	}
	dirs, _ := filepath.Glob(filepath.Join("/etc/netns", Prefix+"*"))
	for _, d := range dirs {
		_ = os.RemoveAll(d)
	}
	return errors.Join(errs...)
}

// DialFunc dials from inside a namespace.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// DialIn returns a dialer whose sockets live in namespace ns. The dial
// runs on an OS thread locked to it that enters ns and, once the socket
// exists, returns to the thread's own namespace before it is unlocked.
// (Letting the thread end instead would be simpler, but a child process
// started from that thread with a parent-death signal — every Proc —
// would be killed with it.) addr must be an IP literal.
func DialIn(ns string) DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() { // owned by this dial: ends with it
			runtime.LockOSThread()
			own, err := os.Open("/proc/thread-self/ns/net")
			if err != nil {
				runtime.UnlockOSThread()
				ch <- result{nil, fmt.Errorf("cannot open this thread's namespace: %w", err)}
				return
			}
			defer own.Close()
			f, err := os.Open(filepath.Join("/run/netns", ns))
			if err != nil {
				runtime.UnlockOSThread()
				ch <- result{nil, fmt.Errorf("cannot open namespace %s: %w", ns, err)}
				return
			}
			defer f.Close()
			if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
				runtime.UnlockOSThread()
				ch <- result{nil, fmt.Errorf("cannot enter namespace %s: %w", ns, err)}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if unix.Setns(int(own.Fd()), unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			} // else: stay locked, and the thread ends with this goroutine
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
}
