package builds

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"unicode/utf8"

	"github.com/zeitwork/zeitwork/internal/build"
)

// Bounds of a stored build log: the newest lines are kept.
const (
	MaxLogLines   = 10_000
	MaxLogBytes   = 2 << 20
	MaxLineBytes  = 16 << 10 // longer lines are cut
	maxWireLine   = 1 << 20  // longer NDJSON records are skipped
	maxStreamName = 16
)

// ScanLog reads an NDJSON build log (one build.LogLine per line) and calls
// fn for every well-formed record, cleaned so PostgreSQL stores it as is:
// valid UTF-8, no NUL, the line cut to MaxLineBytes, a stream name. Blank,
// malformed and over-long records are skipped. It returns fn's error, or
// the reader's (nil at EOF).
func ScanLog(r io.Reader, fn func(build.LogLine) error) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var rec []byte
	skipping := false
	for {
		chunk, err := br.ReadSlice('\n')
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			if !skipping && len(rec)+len(chunk) <= maxWireLine {
				rec = append(rec, chunk...)
			} else {
				skipping, rec = true, rec[:0]
			}
			continue
		case err != nil && !errors.Is(err, io.EOF):
			return err
		}
		if !skipping && len(rec)+len(chunk) <= maxWireLine {
			rec = append(rec, chunk...)
			if l, ok := parseLine(rec); ok {
				if ferr := fn(l); ferr != nil {
					return ferr
				}
			}
		}
		rec, skipping = rec[:0], false
		if err != nil { // EOF
			return nil
		}
	}
}

func parseLine(b []byte) (build.LogLine, bool) {
	var l build.LogLine
	if len(strings.TrimSpace(string(b))) == 0 || json.Unmarshal(b, &l) != nil {
		return l, false
	}
	l.Line = clean(l.Line, MaxLineBytes)
	l.Stream = clean(l.Stream, maxStreamName)
	if l.Stream == "" {
		l.Stream = "build"
	}
	return l, true
}

// clean makes s valid UTF-8 without NUL and at most max bytes long (cut
// at a rune boundary).
func clean(s string, max int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.ReplaceAll(s, "\x00", "")
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

// Log is a build log bounded to MaxLogLines and MaxLogBytes: adding past
// either bound drops the oldest lines. Sequence numbers only grow.
type Log struct {
	lines   []build.LogLine // lines[start:] are kept
	start   int
	bytes   int
	Dropped int // lines dropped from the front
}

// Add appends a line (its seq raised above the previous one if needed).
func (l *Log) Add(line build.LogLine) {
	if n := len(l.lines); n > l.start && line.Seq <= l.lines[n-1].Seq {
		line.Seq = l.lines[n-1].Seq + 1
	}
	l.lines = append(l.lines, line)
	l.bytes += len(line.Line)
	for len(l.lines)-l.start > MaxLogLines || l.bytes > MaxLogBytes {
		l.bytes -= len(l.lines[l.start].Line)
		l.lines[l.start] = build.LogLine{}
		l.start++
		l.Dropped++
	}
	if l.start >= MaxLogLines { // compact now and then: amortised O(1)
		l.lines = append(l.lines[:0], l.lines[l.start:]...)
		l.start = 0
	}
}

// Lines are the kept lines, oldest first.
func (l *Log) Lines() []build.LogLine { return l.lines[l.start:] }

// Truncated reports whether lines were dropped.
func (l *Log) Truncated() bool { return l.Dropped > 0 }

// ReadLog reads a whole NDJSON build log into a bounded Log.
func ReadLog(r io.Reader) (*Log, error) {
	l := &Log{}
	err := ScanLog(r, func(line build.LogLine) error { l.Add(line); return nil })
	return l, err
}
