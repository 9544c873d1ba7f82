package hostmetrics

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/zeitwork/zeitwork/internal/metricstest"
)

const statFixture = `cpu  4705 356 584 3699 23 23 0 7 11 0
cpu0 2000 100 300 1800 10 10 0 3 5 0
cpu1 2705 256 284 1899 13 13 0 4 6 0
intr 1462898 0 0
ctxt 12345
cpufreq 12
`

const meminfoFixture = `MemTotal:       16384000 kB
MemFree:         1000000 kB
MemAvailable:    8192000 kB
HugePages_Total:       0
`

const diskstatsFixture = `   7       0 loop0 10 0 80 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 269714 46893 9706210 158427 53502 107145 14852456 59989 0 33076 229200 130077 99 10346568 10385 6473 397
 254       1 vda1 1 0 8 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 253       0 zram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
`

const netdevFixture = `Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 281040552  657354    0    0    0     0          0         0 281040552  657354    0    0    0     0       0          0
  eth0: 599528751   20096    3    0    0     0          0         0  1009315   10755    4    0    0     0       0          0
zw8cc051:   71099     601    0    0    0     0          0         0    69185     831    0    0    0     0       0          0
`

func TestParsers(t *testing.T) {
	st, err := ParseStat([]byte(statFixture))
	if err != nil {
		t.Fatal(err)
	}
	if st.CPUs != 2 || len(st.Modes) != 8 || st.Modes[0] != (CPUMode{"user", 47.05}) || st.Modes[3] != (CPUMode{"idle", 36.99}) || st.Modes[7] != (CPUMode{"steal", 0.07}) {
		t.Errorf("stat = %+v", st)
	}
	mi, err := ParseMeminfo([]byte(meminfoFixture))
	if err != nil || mi.TotalBytes != 16384000*1024 || mi.AvailableBytes != 8192000*1024 {
		t.Errorf("meminfo = %+v, %v", mi, err)
	}
	disks, err := ParseDiskstats([]byte(diskstatsFixture))
	if err != nil || len(disks) != 4 {
		t.Fatalf("diskstats = %+v, %v", disks, err)
	}
	if d := disks[1]; d.Device != "vda" || d.ReadBytes != 9706210*512 || d.WrittenBytes != 14852456*512 || d.IOTimeSeconds != 33.076 {
		t.Errorf("vda = %+v", d)
	}
	ifs, err := ParseNetDev([]byte(netdevFixture))
	if err != nil || len(ifs) != 3 {
		t.Fatalf("net/dev = %+v, %v", ifs, err)
	}
	if i := ifs[1]; i != (Interface{Name: "eth0", RxBytes: 599528751, RxErrors: 3, TxBytes: 1009315, TxErrors: 4}) {
		t.Errorf("eth0 = %+v", i)
	}

	for name, bad := range map[string]func() error{
		"stat without cpu":     func() error { _, err := ParseStat([]byte("intr 1\n")); return err },
		"stat short cpu":       func() error { _, err := ParseStat([]byte("cpu 1 2\n")); return err },
		"stat negative":        func() error { _, err := ParseStat([]byte("cpu 1 2 -3 4\n")); return err },
		"meminfo no available": func() error { _, err := ParseMeminfo([]byte("MemTotal: 1 kB\n")); return err },
		"meminfo unit":         func() error { _, err := ParseMeminfo([]byte("MemTotal: 1 MB\nMemAvailable: 1 kB\n")); return err },
		"diskstats short":      func() error { _, err := ParseDiskstats([]byte("1 2 sda 3\n")); return err },
		"netdev short":         func() error { _, err := ParseNetDev([]byte("eth0: 1 2 3\n")); return err },
	} {
		if bad() == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// TestCollector reads a fake /proc and /sys/block: whole disks only, no
// lo and no VM taps, the file system of the given path.
func TestCollector(t *testing.T) {
	dir := t.TempDir()
	proc, sys := filepath.Join(dir, "proc"), filepath.Join(dir, "sys")
	for f, s := range map[string]string{"stat": statFixture, "meminfo": meminfoFixture, "diskstats": diskstatsFixture, "net/dev": netdevFixture} {
		p := filepath.Join(proc, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"loop0", "vda", "zram0"} {
		if err := os.MkdirAll(filepath.Join(sys, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c := New(Config{FilesystemPath: dir, TapPrefixes: []string{"zw"}, ProcDir: proc, SysBlockDir: sys})
	got := gather(t, c)
	for k, v := range map[string]float64{
		"zeitwork_node_cpus":                                            2,
		`zeitwork_node_cpu_seconds_total{mode="user"}`:                  47.05,
		`zeitwork_node_cpu_seconds_total{mode="steal"}`:                 0.07,
		"zeitwork_node_memory_total_bytes":                              16384000 * 1024,
		"zeitwork_node_memory_available_bytes":                          8192000 * 1024,
		`zeitwork_node_disk_read_bytes_total{device="vda"}`:             9706210 * 512,
		`zeitwork_node_disk_written_bytes_total{device="vda"}`:          14852456 * 512,
		`zeitwork_node_disk_io_time_seconds_total{device="vda"}`:        33.076,
		`zeitwork_node_network_receive_bytes_total{interface="eth0"}`:   599528751,
		`zeitwork_node_network_transmit_errors_total{interface="eth0"}`: 4,
		`zeitwork_node_scrape_errors_total{source="stat"}`:              0,
	} {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
	for k := range got {
		if strings.Contains(k, "loop0") || strings.Contains(k, "vda1") || strings.Contains(k, "zram0") || strings.Contains(k, `"lo"`) || strings.Contains(k, "zw8cc051") {
			t.Errorf("unexpected series %s", k)
		}
	}
	if got["zeitwork_node_filesystem_size_bytes"] <= 0 || got["zeitwork_node_filesystem_avail_bytes"] <= 0 {
		t.Errorf("file system series: %v", got)
	}
	missing := gather(t, New(Config{ProcDir: filepath.Join(dir, "missing"), SysBlockDir: sys}))
	for _, s := range []string{"stat", "meminfo", "diskstats", "netdev"} {
		if missing[`zeitwork_node_scrape_errors_total{source="`+s+`"}`] != 1 {
			t.Errorf("unreadable %s not counted: %v", s, missing)
		}
	}
	if _, ok := missing["zeitwork_node_memory_total_bytes"]; ok {
		t.Error("an unreadable meminfo still reports memory")
	}
}

// gather collects c through a pedantic registry and returns every sample
// gather collects c: name{labels} → value.
func gather(t *testing.T, c prometheus.Collector) map[string]float64 {
	return metricstest.Gather(t, c)
}

// TestRealHost reads this machine: every family is there and the
// registry accepts it (consistent descriptors, valid label values).
func TestRealHost(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("linux only")
	}
	got := map[string]bool{}
	for k := range gather(t, New(Config{FilesystemPath: t.TempDir(), TapPrefixes: []string{"zw"}})) {
		name, _, _ := strings.Cut(k, "{")
		got[name] = true
	}
	for _, n := range []string{"zeitwork_node_cpus", "zeitwork_node_cpu_seconds_total", "zeitwork_node_memory_total_bytes",
		"zeitwork_node_memory_available_bytes", "zeitwork_node_filesystem_size_bytes", "zeitwork_node_filesystem_avail_bytes",
		"zeitwork_node_network_receive_bytes_total", "zeitwork_node_network_transmit_bytes_total"} {
		if !got[n] {
			t.Errorf("missing %s", n)
		}
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte(statFixture))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := ParseStat(b)
		if err == nil && (len(st.Modes) < 4 || st.CPUs < 0) {
			t.Fatalf("accepted %q as %+v", b, st)
		}
	})
}

func FuzzParseMeminfo(f *testing.F) {
	f.Add([]byte(meminfoFixture))
	f.Fuzz(func(t *testing.T, b []byte) { _, _ = ParseMeminfo(b) })
}

func FuzzParseDiskstats(f *testing.F) {
	f.Add([]byte(diskstatsFixture))
	f.Fuzz(func(t *testing.T, b []byte) {
		disks, _ := ParseDiskstats(b)
		for _, d := range disks {
			if d.Device == "" {
				t.Fatalf("empty device name from %q", b)
			}
			_ = prometheus.MustNewConstMetric(prometheus.NewDesc("x", "x", []string{"device"}, nil), prometheus.CounterValue, 1, d.Device)
		}
	})
}

func FuzzParseNetDev(f *testing.F) {
	f.Add([]byte(netdevFixture))
	f.Fuzz(func(t *testing.T, b []byte) {
		ifs, _ := ParseNetDev(b)
		for _, i := range ifs {
			_ = prometheus.MustNewConstMetric(prometheus.NewDesc("x", "x", []string{"interface"}, nil), prometheus.CounterValue, 1, i.Name)
		}
	})
}
