package topology

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// wire is a point-to-point link with latency between two namespaces: a
// TUN device in each, and this process carrying every packet from one to
// the other after a fixed delay (one way). It stands in for tc netem,
// which kernels without sch_netem lack. Cut drops every packet silently,
// as a lost link does: no reset, no ICMP.
type wire struct {
	a, b  *os.File
	delay time.Duration
	cut   atomic.Bool
	wg    sync.WaitGroup
}

// openTun creates TUN device name (IP packets, no header) in the
// calling process's namespace.
func openTun(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("cannot open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("cannot create TUN device %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "tun:"+name), nil
}

// newWire links namespace nsA (device devA, address addrA/30) with nsB
// (devB, addrB/30) with a one-way delay.
func newWire(nsA, devA, addrA, nsB, devB, addrB string, delay time.Duration) (_ *wire, err error) {
	w := &wire{delay: delay}
	defer func() {
		if err != nil {
			w.close()
		}
	}()
	// Created in the root namespace under temporary names, then moved.
	tmpA, tmpB := Prefix+"t"+devA, Prefix+"t"+strings.TrimPrefix(nsB, Prefix)
	if w.a, err = openTun(tmpA); err != nil {
		return nil, err
	}
	if w.b, err = openTun(tmpB); err != nil {
		return nil, err
	}
	for _, s := range []struct{ tmp, ns, dev, addr string }{{tmpA, nsA, devA, addrA}, {tmpB, nsB, devB, addrB}} {
		if err := run("ip", "link", "set", s.tmp, "netns", s.ns); err != nil {
			return nil, err
		}
		if err := ipn(s.ns, "link", "set", s.tmp, "name", s.dev); err != nil {
			return nil, err
		}
		if err := ipn(s.ns, "addr", "add", s.addr+"/30", "dev", s.dev); err != nil {
			return nil, err
		}
		if err := ipn(s.ns, "link", "set", s.dev, "up"); err != nil {
			return nil, err
		}
	}
	w.wg.Go(func() { w.pump(w.a, w.b) })
	w.wg.Go(func() { w.pump(w.b, w.a) })
	return w, nil
}

type packet struct {
	b   []byte
	due time.Time
}

// wireNice is the niceness of the threads carrying packets: a real link
// does not slow down when its hosts are busy, so the emulated one runs
// ahead of the microVMs and services competing for this machine's CPUs.
const wireNice = -10

// onWireThread locks the calling goroutine to its thread (for good: the
// thread ends with the goroutine) and gives the thread wireNice.
func onWireThread() {
	runtime.LockOSThread()
	_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), wireNice)
}

// pump carries packets from src to dst, each delay after it was read.
// It returns when src is closed.
func (w *wire) pump(src, dst *os.File) {
	onWireThread()
	q := make(chan packet, 4096)
	var wg sync.WaitGroup
	wg.Go(func() {
		onWireThread()
		for p := range q {
			if d := time.Until(p.due); d > 0 {
				time.Sleep(d)
			}
			_, _ = dst.Write(p.b)
		}
	})
	defer wg.Wait()
	defer close(q)
	buf := make([]byte, 65536)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		if w.cut.Load() {
			continue
		}
		select {
		case q <- packet{b: append([]byte(nil), buf[:n]...), due: time.Now().Add(w.delay)}:
		default: // queue full: the link drops, as a congested one does
		}
	}
}

// close removes both devices and waits for the pumps.
func (w *wire) close() {
	if w.a != nil {
		w.a.Close()
	}
	if w.b != nil {
		w.b.Close()
	}
	w.wg.Wait()
}
