package vmm_test

import (
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/vmm"
	"github.com/zeitwork/zeitwork/internal/vmm/vmmtest"
)

func threadNice(t *testing.T, pid int) []int {
	t.Helper()
	n, err := vmmtest.ThreadNice(pid)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestStart: the child runs at the nice value asked for, and no thread of
// the caller is left at it.
func TestStart(t *testing.T) {
	before := threadNice(t, os.Getpid())[0]
	for _, nice := range []int{0, 7} {
		cmd := exec.Command("sleep", "30")
		if err := vmm.Start(cmd, nice); err != nil {
			t.Fatal(err)
		}
		got := threadNice(t, cmd.Process.Pid)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if len(got) != 1 || got[0] != nice+before {
			t.Errorf("Start(sleep, %d): the process runs at %v", nice, got)
		}
	}
	// Without the privilege to restore the forking thread, the runtime
	// ends it shortly after its goroutine returns.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		other := slices.DeleteFunc(threadNice(t, os.Getpid()), func(n int) bool { return n == before })
		if len(other) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("threads of the caller run at nice %v (was %d)", other, before)
		}
	}
	for _, bad := range []int{20, -21} {
		if err := vmm.Start(exec.Command("true"), bad); err == nil {
			t.Errorf("nice %d accepted", bad)
		}
	}
}
