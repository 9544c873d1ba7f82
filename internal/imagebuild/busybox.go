package imagebuild

import (
	"archive/tar"
	"fmt"
	"os"
	"os/exec"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// BusyboxPath is where Debian's busybox-static lives on the host.
const BusyboxPath = "/bin/busybox"

// BusyboxLayer is a small base for builds from source in tests and
// benchmarks (which never pull from the internet): Debian's static
// busybox as /bin/busybox with a link for each applet (sh, wget, httpd,
// nc, …), /etc/passwd and /etc/group, /tmp, /root and /srv.
func BusyboxLayer() (v1.Layer, error) {
	bin, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, fmt.Errorf("busybox-static is needed (make deps installs it): %w", err)
	}
	out, err := exec.Command(BusyboxPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %w", err)
	}
	entries := []Entry{{Name: "bin", Type: tar.TypeDir}, {Name: "etc", Type: tar.TypeDir}, {Name: "tmp", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "root", Type: tar.TypeDir}, {Name: "srv", Type: tar.TypeDir}, {Name: "bin/busybox", Mode: 0o755, Data: bin},
		{Name: "etc/passwd", Data: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")},
		{Name: "etc/group", Data: []byte("root:x:0:\nnogroup:x:65534:\n")}}
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" {
			entries = append(entries, Entry{Name: "bin/" + applet, Type: tar.TypeSymlink, Linkname: "busybox"})
		}
	}
	return Layer(entries...)
}

// BusyboxConfig is the runtime config of an image of BusyboxLayer alone.
var BusyboxConfig = Config{Env: []string{"PATH=/bin"}, Cmd: []string{"/bin/sh"}}
