package vmmtest

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ThreadNice returns the nice value of every thread of process pid
// (field 19 of /proc/<pid>/task/*/stat).
func ThreadNice(pid int) ([]int, error) {
	stats, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	if err != nil {
		return nil, err
	}
	if len(stats) == 0 {
		return nil, fmt.Errorf("process %d has no threads", pid)
	}
	var out []int
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread ended
		}
		// The command name (field 2) may hold spaces and parentheses:
		// fields are counted from after its last ')', which is field 3.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 19-2 {
			return nil, fmt.Errorf("%s: short stat line", p)
		}
		n, err := strconv.Atoi(f[19-3])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		out = append(out, n)
	}
	return out, nil
}
