package fctest

import (
	"fmt"
	"os/exec"
	"path/filepath"
)

// Build compiles cmd/fake-firecracker into dir as "firecracker" (call it
// once from TestMain) and returns its path. A copy named "jailer" is not
// needed: the same binary acts as the jailer when given --exec-file.
func Build(dir string) (string, error) {
	bin := filepath.Join(dir, "firecracker")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/zeitwork/zeitwork/internal/vmm/firecracker/fctest/cmd/fake-firecracker").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("cannot build fake-firecracker: %v\n%s", err, out)
	}
	return bin, nil
}
