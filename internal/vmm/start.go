package vmm

import (
	"fmt"
	"os/exec"
	"runtime"

	"golang.org/x/sys/unix"
)

// DefaultNice is the scheduling niceness VMM processes run at unless
// configured (VM_NICE): a guest spinning its vCPUs gets the CPU the host's
// own services (node agent, data plane, edge, load balancer) leave over,
// instead of an equal share that lets a burst of boots starve heartbeats,
// health checks and proxying.
const DefaultNice = 10

// Start starts cmd at niceness nice (0 leaves the caller's). The VMM
// process and every thread it creates inherit it from the start: nothing
// is re-niced after the fact, so no vCPU thread runs at the host's
// priority even briefly.
//
// Linux keeps the nice value per thread and a child inherits its forking
// thread's, so cmd is forked from a goroutine locked to its thread, with
// the thread's nice value set for the fork and restored after it. Where it
// cannot be restored (raising priority needs CAP_SYS_NICE), the thread is
// never handed back to the Go scheduler: the goroutine returns still
// locked to it, which ends the thread.
func Start(cmd *exec.Cmd, nice int) error {
	if nice == 0 {
		return cmd.Start()
	}
	if nice < -20 || nice > 19 {
		return fmt.Errorf("nice %d is outside -20..19", nice)
	}
	if cmd.SysProcAttr != nil && cmd.SysProcAttr.Pdeathsig != 0 {
		// The parent-death signal would fire when the forking thread ends.
		return fmt.Errorf("cannot start %s at nice %d with a parent-death signal", cmd.Path, nice)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// The raw getpriority(2) answers 20 - nice.
		prio, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
		if err != nil {
			errc <- fmt.Errorf("cannot read the thread's nice value: %w", err)
			return
		}
		if err := unix.Setpriority(unix.PRIO_PROCESS, 0, nice); err != nil {
			errc <- fmt.Errorf("cannot set nice %d: %w", nice, err)
			return
		}
		err = cmd.Start()
		if unix.Setpriority(unix.PRIO_PROCESS, 0, 20-prio) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}
