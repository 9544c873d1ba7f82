package hostmetrics

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// userHZ is the unit of /proc/stat's CPU times: USER_HZ, 100 on every
// Linux architecture Zeitwork runs on.
const userHZ = 100

// CPUMode is one mode's CPU time summed over all CPUs.
type CPUMode struct {
	Mode    string
	Seconds float64
}

// Stat is what Zeitwork reads from /proc/stat.
type Stat struct {
	CPUs  int
	Modes []CPUMode
}

// cpuModes are the columns of a /proc/stat cpu line that are exported, in
// order. guest and guest_nice are left out: the kernel already counts them
// in user and nice.
var cpuModes = []string{"user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"}

// ParseStat reads the aggregate cpu line and counts the cpuN lines.
func ParseStat(b []byte) (Stat, error) {
	var st Stat
	found := false
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || !strings.HasPrefix(f[0], "cpu") {
			continue
		}
		if f[0] != "cpu" {
			if _, err := strconv.Atoi(f[0][3:]); err == nil {
				st.CPUs++
			}
			continue
		}
		if found {
			return Stat{}, errors.New("two aggregate cpu lines")
		}
		found = true
		if len(f) < 5 { // user nice system idle at least (Linux 2.4)
			return Stat{}, fmt.Errorf("cpu line has %d fields", len(f))
		}
		for i, m := range cpuModes {
			if i+1 >= len(f) {
				break
			}
			v, err := strconv.ParseUint(f[i+1], 10, 64)
			if err != nil {
				return Stat{}, fmt.Errorf("cpu %s: %w", m, err)
			}
			st.Modes = append(st.Modes, CPUMode{Mode: m, Seconds: float64(v) / userHZ})
		}
	}
	if err := sc.Err(); err != nil {
		return Stat{}, err
	}
	if !found {
		return Stat{}, errors.New("no aggregate cpu line")
	}
	return st, nil
}

// Meminfo is what Zeitwork reads from /proc/meminfo.
type Meminfo struct {
	TotalBytes, AvailableBytes uint64
}

// ParseMeminfo reads MemTotal and MemAvailable (both required).
func ParseMeminfo(b []byte) (Meminfo, error) {
	var mi Meminfo
	var total, avail bool
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || (key != "MemTotal" && key != "MemAvailable") {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 || len(f) > 2 || (len(f) == 2 && f[1] != "kB") {
			return Meminfo{}, fmt.Errorf("%s: malformed value %q", key, rest)
		}
		v, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return Meminfo{}, fmt.Errorf("%s: %w", key, err)
		}
		if len(f) == 2 {
			if v > (1<<64-1)/1024 {
				return Meminfo{}, fmt.Errorf("%s: %d kB overflows", key, v)
			}
			v *= 1024
		}
		if key == "MemTotal" {
			mi.TotalBytes, total = v, true
		} else {
			mi.AvailableBytes, avail = v, true
		}
	}
	if err := sc.Err(); err != nil {
		return Meminfo{}, err
	}
	if !total || !avail {
		return Meminfo{}, errors.New("MemTotal or MemAvailable missing")
	}
	return mi, nil
}

// Disk is one line of /proc/diskstats.
type Disk struct {
	Device                  string
	ReadBytes, WrittenBytes uint64
	IOTimeSeconds           float64
}

// sectorBytes is the unit of /proc/diskstats' sector counts, whatever the
// device's real sector size.
const sectorBytes = 512

// ParseDiskstats reads every device line. A malformed line is skipped and
// reported in the error after the lines that parsed.
func ParseDiskstats(b []byte) ([]Disk, error) {
	var out []Disk
	var errs []error
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) < 14 || !utf8.ValidString(f[2]) {
			errs = append(errs, fmt.Errorf("diskstats line with %d fields", len(f)))
			continue
		}
		var n [3]uint64
		var err error
		for i, col := range []int{5, 9, 12} {
			if n[i], err = strconv.ParseUint(f[col], 10, 64); err != nil {
				break
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("diskstats %s: %w", f[2], err))
			continue
		}
		out = append(out, Disk{Device: f[2], ReadBytes: n[0] * sectorBytes, WrittenBytes: n[1] * sectorBytes, IOTimeSeconds: float64(n[2]) / 1000})
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, err)
	}
	return out, errors.Join(errs...)
}

// Interface is one line of /proc/net/dev.
type Interface struct {
	Name                                 string
	RxBytes, RxErrors, TxBytes, TxErrors uint64
}

// ParseNetDev reads every interface line after the two header lines. A
// malformed line is skipped and reported in the error.
func ParseNetDev(b []byte) ([]Interface, error) {
	var out []Interface
	var errs []error
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue // the two header lines
		}
		name = strings.TrimSpace(name)
		f := strings.Fields(rest)
		if name == "" || strings.ContainsAny(name, " |") || !utf8.ValidString(name) || len(f) < 16 {
			errs = append(errs, fmt.Errorf("net/dev line %q", sc.Text()))
			continue
		}
		var n [4]uint64
		var err error
		for i, col := range []int{0, 2, 8, 10} {
			if n[i], err = strconv.ParseUint(f[col], 10, 64); err != nil {
				break
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("net/dev %s: %w", name, err))
			continue
		}
		out = append(out, Interface{Name: name, RxBytes: n[0], RxErrors: n[1], TxBytes: n[2], TxErrors: n[3]})
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, err)
	}
	return out, errors.Join(errs...)
}
