// Package hostmetrics exports a worker's CPU, memory, disk and network
// usage as Prometheus metrics, read from /proc, /sys/block and statfs at
// scrape time: what the node agent reports beside its own metrics so that
// every node's resources are visible without a separate exporter.
//
// Families (all without per-request or per-VM labels):
//
//	zeitwork_node_cpus                                  gauge
//	zeitwork_node_cpu_seconds_total{mode}               counter (all CPUs summed)
//	zeitwork_node_memory_total_bytes                    gauge
//	zeitwork_node_memory_available_bytes                gauge
//	zeitwork_node_filesystem_size_bytes                 gauge (the VM work directory's file system)
//	zeitwork_node_filesystem_avail_bytes                gauge
//	zeitwork_node_disk_read_bytes_total{device}         counter (whole disks, no loop/ram/zram)
//	zeitwork_node_disk_written_bytes_total{device}      counter
//	zeitwork_node_disk_io_time_seconds_total{device}    counter
//	zeitwork_node_network_receive_bytes_total{interface}   counter (no lo, no VM taps)
//	zeitwork_node_network_transmit_bytes_total{interface}  counter
//	zeitwork_node_network_receive_errors_total{interface}  counter
//	zeitwork_node_network_transmit_errors_total{interface} counter
//
// A source that cannot be read is left out of that scrape (and counted in
// zeitwork_node_scrape_errors_total{source}); nothing reports a made-up 0.
package hostmetrics

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
)

// Config says where to read from. The zero value of a path field means
// the host's real file.
type Config struct {
	// FilesystemPath is a path on the file system whose size and free space
	// are reported (the node agent's VM_WORK_DIR).
	FilesystemPath string
	// TapPrefixes are interface name prefixes left out of the network
	// metrics (one interface per VM would be an unbounded label).
	TapPrefixes []string

	ProcDir     string // default /proc
	SysBlockDir string // default /sys/block
}

// Collector is a prometheus.Collector over the host.
type Collector struct {
	cfg Config

	cpus, cpu, memTotal, memAvail, fsSize, fsAvail *prometheus.Desc
	diskRead, diskWritten, diskIOTime              *prometheus.Desc
	netRx, netTx, netRxErr, netTxErr               *prometheus.Desc
	errors                                         *prometheus.CounterVec
}

var _ prometheus.Collector = (*Collector)(nil)

// New returns a collector for the host described by cfg.
func New(cfg Config) *Collector {
	if cfg.ProcDir == "" {
		cfg.ProcDir = "/proc"
	}
	if cfg.SysBlockDir == "" {
		cfg.SysBlockDir = "/sys/block"
	}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("zeitwork_node_"+name, help, labels, nil)
	}
	c := &Collector{
		cfg:         cfg,
		cpus:        d("cpus", "Logical CPUs of the host."),
		cpu:         d("cpu_seconds_total", "CPU time of all the host's CPUs by mode (from /proc/stat).", "mode"),
		memTotal:    d("memory_total_bytes", "Memory of the host (MemTotal)."),
		memAvail:    d("memory_available_bytes", "Memory available for new work without swapping (MemAvailable)."),
		fsSize:      d("filesystem_size_bytes", "Size of the file system holding the VM work directory."),
		fsAvail:     d("filesystem_avail_bytes", "Space available to unprivileged users on the file system holding the VM work directory."),
		diskRead:    d("disk_read_bytes_total", "Bytes read from a whole disk (from /proc/diskstats).", "device"),
		diskWritten: d("disk_written_bytes_total", "Bytes written to a whole disk (from /proc/diskstats).", "device"),
		diskIOTime:  d("disk_io_time_seconds_total", "Time a whole disk spent doing I/O (from /proc/diskstats).", "device"),
		netRx:       d("network_receive_bytes_total", "Bytes received by a host interface (VM taps and lo excluded).", "interface"),
		netTx:       d("network_transmit_bytes_total", "Bytes sent by a host interface (VM taps and lo excluded).", "interface"),
		netRxErr:    d("network_receive_errors_total", "Receive errors of a host interface.", "interface"),
		netTxErr:    d("network_transmit_errors_total", "Transmit errors of a host interface.", "interface"),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "zeitwork_node_scrape_errors_total",
			Help: "Host sources that could not be read during a scrape, by source."}, []string{"source"}),
	}
	for _, s := range []string{"stat", "meminfo", "statfs", "diskstats", "netdev"} {
		c.errors.WithLabelValues(s)
	}
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.cpus, c.cpu, c.memTotal, c.memAvail, c.fsSize, c.fsAvail,
		c.diskRead, c.diskWritten, c.diskIOTime, c.netRx, c.netTx, c.netRxErr, c.netTxErr} {
		ch <- d
	}
	c.errors.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	defer c.errors.Collect(ch)
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	counter := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, l...)
	}
	if b, err := os.ReadFile(filepath.Join(c.cfg.ProcDir, "stat")); err == nil {
		if st, err := ParseStat(b); err == nil {
			gauge(c.cpus, float64(st.CPUs))
			for _, m := range st.Modes {
				counter(c.cpu, m.Seconds, m.Mode)
			}
		} else {
			c.errors.WithLabelValues("stat").Inc()
		}
	} else {
		c.errors.WithLabelValues("stat").Inc()
	}
	if b, err := os.ReadFile(filepath.Join(c.cfg.ProcDir, "meminfo")); err == nil {
		if mi, err := ParseMeminfo(b); err == nil {
			gauge(c.memTotal, float64(mi.TotalBytes))
			gauge(c.memAvail, float64(mi.AvailableBytes))
		} else {
			c.errors.WithLabelValues("meminfo").Inc()
		}
	} else {
		c.errors.WithLabelValues("meminfo").Inc()
	}
	if c.cfg.FilesystemPath != "" {
		var fs syscall.Statfs_t
		if err := syscall.Statfs(c.cfg.FilesystemPath, &fs); err == nil {
			gauge(c.fsSize, float64(fs.Blocks)*float64(fs.Bsize))
			gauge(c.fsAvail, float64(fs.Bavail)*float64(fs.Bsize))
		} else {
			c.errors.WithLabelValues("statfs").Inc()
		}
	}
	if b, err := os.ReadFile(filepath.Join(c.cfg.ProcDir, "diskstats")); err == nil {
		disks, err := ParseDiskstats(b)
		if err != nil {
			c.errors.WithLabelValues("diskstats").Inc()
		}
		for _, d := range disks {
			if !c.wholeDisk(d.Device) {
				continue
			}
			counter(c.diskRead, float64(d.ReadBytes), d.Device)
			counter(c.diskWritten, float64(d.WrittenBytes), d.Device)
			counter(c.diskIOTime, d.IOTimeSeconds, d.Device)
		}
	} else {
		c.errors.WithLabelValues("diskstats").Inc()
	}
	if b, err := os.ReadFile(filepath.Join(c.cfg.ProcDir, "net", "dev")); err == nil {
		ifs, err := ParseNetDev(b)
		if err != nil {
			c.errors.WithLabelValues("netdev").Inc()
		}
		for _, i := range ifs {
			if !c.hostInterface(i.Name) {
				continue
			}
			counter(c.netRx, float64(i.RxBytes), i.Name)
			counter(c.netTx, float64(i.TxBytes), i.Name)
			counter(c.netRxErr, float64(i.RxErrors), i.Name)
			counter(c.netTxErr, float64(i.TxErrors), i.Name)
		}
	} else {
		c.errors.WithLabelValues("netdev").Inc()
	}
}

// wholeDisk reports whether a diskstats device is a disk worth reporting:
// listed in /sys/block (partitions are not) and not a loop, RAM, zram,
// optical or floppy device.
func (c *Collector) wholeDisk(dev string) bool {
	for _, p := range []string{"loop", "ram", "zram", "sr", "fd"} {
		if strings.HasPrefix(dev, p) {
			return false
		}
	}
	_, err := os.Stat(filepath.Join(c.cfg.SysBlockDir, dev))
	return err == nil
}

func (c *Collector) hostInterface(name string) bool {
	if name == "lo" {
		return false
	}
	for _, p := range c.cfg.TapPrefixes {
		if p != "" && strings.HasPrefix(name, p) {
			return false
		}
	}
	return true
}
