package observability

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// journaldScript runs Debian's systemd-journald without systemd, in a
// private mount namespace: tmpfs over /run and /var/log (the host's
// journal is not touched) and $CONF over /etc/systemd. It writes $LINES
// lines of about 1 KiB through systemd-cat, flushes to the persistent
// journal, stops journald and copies the journal files to $OUT.
const journaldScript = `set -e
mount -t tmpfs -o size=$FS_SIZE tmpfs /run
mkdir -p /run/systemd/journal /run/log
mount -t tmpfs -o size=$FS_SIZE tmpfs /var/log
mkdir -p /var/log/journal
mount --bind "$CONF" /etc/systemd
/lib/systemd/systemd-journald > "$OUT/journald.log" 2>&1 &
pid=$!
for i in $(seq 50); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.1; done
journalctl --flush
pad=$(head -c 1000 /dev/zero | tr '\0' x)
seq -f '%06g' 1 "$LINES" | sed "s/^/line /; s/$/ $pad/" | systemd-cat -t zwlogtest
journalctl --sync
kill $pid
wait $pid || true
mkdir -p "$OUT/journal"
cp -r /var/log/journal/. "$OUT/journal/"
journalctl -D /var/log/journal -t zwlogtest -o cat | cut -c1-11 > "$OUT/lines"
journalctl -D /var/log/journal -t systemd-journald -o cat >> "$OUT/journald.log"
`

type journalRun struct {
	log   string           // journald's own output and messages
	files map[string]int64 // journal file name → size
	lines []string         // "line NNNNNN" of the messages kept
}

func runJournald(t *testing.T, conf string, fsSize string, lines int) journalRun {
	t.Helper()
	dir := t.TempDir()
	etc := filepath.Join(dir, "etc")
	if err := os.MkdirAll(filepath.Join(etc, "journald.conf.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(etc, "journald.conf.d", "zeitwork.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", journaldScript)
	cmd.Env = append(os.Environ(), "CONF="+etc, "OUT="+out, "LINES="+strconv.Itoa(lines), "FS_SIZE="+fsSize)
	b, err := cmd.CombinedOutput()
	jlog, _ := os.ReadFile(filepath.Join(out, "journald.log"))
	if err != nil {
		t.Fatalf("journald run: %v\n%s\njournald:\n%s", err, b, jlog)
	}
	r := journalRun{log: string(jlog), files: map[string]int64{}}
	files, _ := filepath.Glob(filepath.Join(out, "journal", "*", "*.journal"))
	for _, f := range files {
		fi, err := os.Stat(f)
		if err == nil {
			r.files[filepath.Base(f)] = fi.Size()
		}
	}
	kept, _ := os.ReadFile(filepath.Join(out, "lines"))
	r.lines = strings.Fields(strings.ReplaceAll(string(kept), "line ", "line_"))
	return r
}

func needJournald(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("runs systemd-journald")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the journald test needs root (a private mount namespace) on CI")
		}
		t.Skip("needs root for a private mount namespace")
	}
	for _, p := range []string{"/lib/systemd/systemd-journald", "/usr/bin/journalctl", "/usr/bin/systemd-cat", "/usr/bin/unshare"} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s is missing (Debian's systemd and util-linux packages): %v", p, err)
		}
	}
}

// TestJournaldLimitsInEffect runs a real systemd-journald with the shipped
// drop-in and checks it reports the drop-in's limit for the persistent
// journal (without it, journald's default is 10 % of the file system).
func TestJournaldLimitsInEffect(t *testing.T) {
	needJournald(t)
	conf, err := os.ReadFile(filepath.Join(kit, "journald", "zeitwork.conf"))
	if err != nil {
		t.Fatal(err)
	}
	r := runJournald(t, string(conf), "8G", 100) // journald's default: 10 % of it, 819.2M
	m := regexp.MustCompile(`System Journal \(\S+\) is \S+, max (\S+), `).FindStringSubmatch(r.log)
	if m == nil {
		t.Fatalf("journald did not report the system journal's limits:\n%s", r.log)
	}
	if m[1] != "4.0G" {
		t.Fatalf("persistent journal limit %s, want the drop-in's 4.0G (SystemMaxUse)", m[1])
	}
	if len(r.lines) != 100 {
		t.Fatalf("%d of 100 lines in the persistent journal", len(r.lines))
	}
}

// TestJournaldRotatesAndVacuums runs journald with the shipped drop-in's
// sizes scaled down 256 times (SystemMaxUse 4G → 16M, SystemMaxFileSize
// 256M → 1M, SystemKeepFree 2G → 8M; every other line as shipped) and
// logs about 40 MiB through it: the journal is rotated into files of at
// most SystemMaxFileSize, the oldest are deleted to stay within
// SystemMaxUse, the newest lines are all kept, and the raised rate limit
// (RateLimitBurst) lets a burst of 40000 lines through. What it does not
// show: the time limits (MaxRetentionSec, MaxFileSec), which would need
// days.
func TestJournaldRotatesAndVacuums(t *testing.T) {
	needJournald(t)
	shipped, err := os.ReadFile(filepath.Join(kit, "journald", "zeitwork.conf"))
	if err != nil {
		t.Fatal(err)
	}
	scaled, limits := scaleJournald(t, string(shipped), 256)
	t.Logf("scaled limits: %v", limits)
	const lines = 40000
	r := runJournald(t, scaled, "1G", lines)
	var total int64
	archived := 0
	for name, size := range r.files {
		total += size
		if strings.Contains(name, "@") {
			archived++
		}
		// A journal file is closed once the next entry would not fit.
		if size > limits["SystemMaxFileSize"]+64<<10 {
			t.Errorf("%s is %d bytes, above SystemMaxFileSize %d", name, size, limits["SystemMaxFileSize"])
		}
	}
	t.Logf("%d journal files (%d archived), %d bytes in all; %d of %d lines kept (first %s)", len(r.files), archived, total, len(r.lines), lines, first(r.lines))
	if archived < 2 {
		t.Errorf("only %d archived journal files: no rotation", archived)
	}
	if total > limits["SystemMaxUse"] {
		t.Errorf("journal uses %d bytes, above SystemMaxUse %d: not vacuumed", total, limits["SystemMaxUse"])
	}
	if len(r.lines) == 0 || len(r.lines) >= lines {
		t.Fatalf("%d of %d lines kept: want the oldest vacuumed and the newest kept", len(r.lines), lines)
	}
	if last := r.lines[len(r.lines)-1]; last != fmt.Sprintf("line_%06d", lines) {
		t.Errorf("newest line kept is %s, want line_%06d", last, lines)
	}
	// The kept lines are the newest ones, none missing in between (no
	// rate limiting, no loss at rotation).
	for i, l := range r.lines {
		if want := fmt.Sprintf("line_%06d", lines-len(r.lines)+1+i); l != want {
			t.Fatalf("line %d kept is %s, want %s (a gap)", i, l, want)
		}
	}
	if strings.Contains(r.log, "Suppressed") {
		t.Errorf("journald rate-limited the burst:\n%s", r.log)
	}
}

func first(l []string) string {
	if len(l) == 0 {
		return "-"
	}
	return l[0]
}

// scaleJournald divides the size settings of a journald drop-in by div and
// returns the result with the scaled sizes in bytes.
func scaleJournald(t *testing.T, conf string, div int64) (string, map[string]int64) {
	t.Helper()
	limits := map[string]int64{}
	var out []string
	for _, l := range strings.Split(conf, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(l), "=")
		if ok && (k == "SystemMaxUse" || k == "SystemMaxFileSize" || k == "SystemKeepFree") {
			n, err := parseSize(v)
			if err != nil {
				t.Fatalf("%s: %v", l, err)
			}
			limits[k] = n / div
			l = fmt.Sprintf("%s=%d", k, n/div)
		}
		out = append(out, l)
	}
	for _, k := range []string{"SystemMaxUse", "SystemMaxFileSize", "SystemKeepFree"} {
		if limits[k] == 0 {
			t.Fatalf("the drop-in sets no %s", k)
		}
	}
	return strings.Join(out, "\n"), limits
}

// parseSize reads a journald size: a number with an optional K, M, G or T
// (powers of 1024).
func parseSize(s string) (int64, error) {
	mult := int64(1)
	if i := strings.IndexAny(s, "KMGT"); i >= 0 && i == len(s)-1 {
		mult = map[byte]int64{'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}[s[i]]
		s = s[:i]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > 1<<50/mult {
		return 0, fmt.Errorf("not a journald size: %q", s)
	}
	return n * mult, nil
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"4G", "256M", "0", "12K", "x", "-1G", "99999999999T"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
		if err == nil && n < 0 {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
	})
}
