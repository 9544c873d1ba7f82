package ocitest

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// BusyboxPath is where Debian's busybox-static lives on the host.
const BusyboxPath = "/bin/busybox"

// Busybox is a small base image for builds from source: Debian's static
// busybox as /bin/busybox with a link for each applet (sh, wget, httpd,
// nc, …), /etc/passwd and /tmp. Tests build their own base images, so
// builds never pull from the internet.
func Busybox(t testing.TB) v1.Image {
	t.Helper()
	bin, err := os.ReadFile(BusyboxPath)
	if err != nil {
		t.Fatalf("busybox-static is needed (make deps installs it): %v", err)
	}
	out, err := exec.Command(BusyboxPath, "--list").Output()
	if err != nil {
		t.Fatal(err)
	}
	entries := []Entry{Dir("bin"), Dir("etc"), {Name: "tmp", Type: '5', Mode: 0o1777}, Dir("root"), Dir("srv"),
		{Name: "bin/busybox", Mode: 0o755, Data: bin},
		File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
		File("etc/group", "root:x:0:\nnogroup:x:65534:\n")}
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" {
			entries = append(entries, Symlink("bin/"+applet, "busybox"))
		}
	}
	return Image(t, Config{Env: []string{"PATH=/bin"}, Cmd: []string{"/bin/sh"}}, Layer(t, entries...))
}
