// Command fake-firecracker stands in for the firecracker binary (and the
// jailer) in tests: it takes their command lines, serves the fake API of
// package fctest on --api-sock, appends every request as a JSON line to
// fake-firecracker.ndjson beside the socket, and exits 0 when the guest is
// sent Ctrl-Alt-Del (as Firecracker does when its guest powers off).
//
// Started with --exec-file it acts as the jailer: it checks the jailer's
// flags and serves inside <chroot-base-dir>/<exec name>/<id>/root, where
// the firecracker arguments after "--" name their paths. It does not
// chroot or drop privileges.
//
// FAKE_FIRECRACKER_IGNORE_CTRL_ALT_DEL=1 makes Ctrl-Alt-Del a no-op.
// FAKE_FIRECRACKER_GUEST_VSOCK=DIR makes DIR/<port>.sock the guest's vsock
// listener on <port>: a host CONNECT is relayed there, and refused when
// nothing listens (see fctest.Server.Guest). Unset, the guest echoes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/zeitwork/zeitwork/internal/vmm/firecracker/fctest"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "fake-firecracker:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	root := ""
	if slices.Contains(args, "--exec-file") {
		var err error
		if root, args, err = jailer(args); err != nil {
			return err
		}
	}
	fs := flag.NewFlagSet("firecracker", flag.ContinueOnError)
	sock := fs.String("api-sock", "", "path to the API socket")
	id := fs.String("id", "anonymous-instance", "microVM id")
	fs.String("level", "Warning", "log level")
	fs.Bool("boot-timer", false, "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *sock == "" || fs.NArg() > 0 {
		return errors.New("usage: firecracker --api-sock PATH [--id ID]")
	}
	if !validID.MatchString(*id) {
		return fmt.Errorf("invalid instance id %q", *id)
	}
	hostSock := root + *sock
	srv, err := fctest.New()
	if err != nil {
		return err
	}
	srv.Root = root
	srv.IgnoreCtrlAltDel = os.Getenv("FAKE_FIRECRACKER_IGNORE_CTRL_ALT_DEL") == "1"
	if dir := os.Getenv("FAKE_FIRECRACKER_GUEST_VSOCK"); dir != "" {
		srv.Guest = func(port uint32) (net.Conn, error) {
			return net.Dial("unix", filepath.Join(dir, fmt.Sprintf("%d.sock", port)))
		}
	}
	logf, err := os.OpenFile(filepath.Join(filepath.Dir(hostSock), "fake-firecracker.ndjson"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	srv.Log = logf
	l, err := net.Listen("unix", hostSock)
	if err != nil {
		return fmt.Errorf("cannot bind the API socket: %w", err)
	}
	hs := &http.Server{Handler: srv}
	serveErr := make(chan error, 1)
	go func() { serveErr <- hs.Serve(l) }() // ends at Shutdown
	fmt.Println("fake-firecracker", fctest.Version, "serving on", hostSock)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-srv.PowerOff():
		fmt.Println("guest powered off (Ctrl-Alt-Del)")
	case s := <-sig:
		fmt.Println("exiting on", s)
	case err := <-serveErr:
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = hs.Shutdown(ctx) // lets the Ctrl-Alt-Del answer go out
	<-serveErr
	return srv.Close()
}

var validID = regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`)

// jailer checks the jailer's command line and returns the chroot and the
// firecracker arguments.
func jailer(args []string) (string, []string, error) {
	i := slices.Index(args, "--")
	if i < 0 {
		return "", nil, errors.New("jailer: no -- before the firecracker arguments")
	}
	fs := flag.NewFlagSet("jailer", flag.ContinueOnError)
	id := fs.String("id", "", "")
	exec := fs.String("exec-file", "", "")
	uid := fs.String("uid", "", "")
	gid := fs.String("gid", "", "")
	base := fs.String("chroot-base-dir", "/srv/jailer", "")
	if err := fs.Parse(args[:i]); err != nil {
		return "", nil, err
	}
	if fs.NArg() > 0 {
		return "", nil, fmt.Errorf("jailer: unexpected arguments %q", fs.Args())
	}
	if !validID.MatchString(*id) {
		return "", nil, fmt.Errorf("jailer: invalid --id %q", *id)
	}
	for name, v := range map[string]string{"uid": *uid, "gid": *gid} {
		if _, err := strconv.ParseUint(v, 10, 32); err != nil {
			return "", nil, fmt.Errorf("jailer: --%s %q is not a number", name, v)
		}
	}
	if st, err := os.Stat(*exec); err != nil || !st.Mode().IsRegular() {
		return "", nil, fmt.Errorf("jailer: --exec-file %q is not a file", *exec)
	}
	root := filepath.Join(*base, filepath.Base(*exec), *id, "root")
	if err := os.MkdirAll(filepath.Join(root, "run"), 0o755); err != nil {
		return "", nil, err
	}
	return root, args[i+1:], nil
}
