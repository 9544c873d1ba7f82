// Package envconfig reads a service's typed configuration from environment
// variables and reports every invalid variable at once.
//
// A service declares its variables through a Loader and calls Err once at the
// end: the error names each bad variable, so an operator fixes them all in one
// edit instead of one restart per mistake.
package envconfig

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Loader reads variables through Lookup (os.LookupEnv by default) and
// collects problems.
type Loader struct {
	Lookup func(string) (string, bool)
	errs   []string
}

// New returns a Loader reading the process environment.
func New() *Loader { return &Loader{Lookup: os.LookupEnv} }

// FromMap returns a Loader reading m, for tests.
func FromMap(m map[string]string) *Loader {
	return &Loader{Lookup: func(k string) (string, bool) { v, ok := m[k]; return v, ok }}
}

func (l *Loader) get(name string) (string, bool) {
	v, ok := l.Lookup(name)
	v = strings.TrimSpace(v)
	if !ok || v == "" {
		return "", false
	}
	return v, true
}

// Errorf records a problem with variable name.
func (l *Loader) Errorf(name, format string, args ...any) {
	l.errs = append(l.errs, name+": "+fmt.Sprintf(format, args...))
}

// String returns the variable or def when unset.
func (l *Loader) String(name, def string) string {
	if v, ok := l.get(name); ok {
		return v
	}
	return def
}

// Required returns the variable and records an error when it is unset.
func (l *Loader) Required(name, why string) string {
	v, ok := l.get(name)
	if !ok {
		l.Errorf(name, "is required (%s)", why)
	}
	return v
}

// Int returns the variable parsed as an integer within [lo, hi].
func (l *Loader) Int(name string, def, lo, hi int) int {
	v, ok := l.get(name)
	if !ok {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		l.Errorf(name, "%q is not an integer", v)
		return def
	}
	if n < lo || n > hi {
		l.Errorf(name, "%d is out of range [%d, %d]", n, lo, hi)
		return def
	}
	return n
}

// Float returns the variable parsed as a non-negative number.
func (l *Loader) Float(name string, def float64) float64 {
	v, ok := l.get(name)
	if !ok {
		return def
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f < 0 {
		l.Errorf(name, "%q is not a non-negative number", v)
		return def
	}
	return f
}

// Bool returns the variable parsed with strconv.ParseBool.
func (l *Loader) Bool(name string, def bool) bool {
	v, ok := l.get(name)
	if !ok {
		return def
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		l.Errorf(name, "%q is not a boolean (true/false)", v)
		return def
	}
	return b
}

// Duration returns the variable parsed with time.ParseDuration (a bare
// integer means seconds).
func (l *Loader) Duration(name string, def time.Duration) time.Duration {
	v, ok := l.get(name)
	if !ok {
		return def
	}
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		return time.Duration(n) * time.Second
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		l.Errorf(name, "%q is not a duration (e.g. 30s, 5m)", v)
		return def
	}
	return d
}

// Enum returns the variable, which must be one of allowed.
func (l *Loader) Enum(name, def string, allowed ...string) string {
	v, ok := l.get(name)
	if !ok {
		return def
	}
	v = strings.ToLower(v)
	if !slices.Contains(allowed, v) {
		l.Errorf(name, "%q is not one of %s", v, strings.Join(allowed, ", "))
		return def
	}
	return v
}

// List returns the comma-separated variable as trimmed, non-empty items.
func (l *Loader) List(name string, def []string) []string {
	v, ok := l.get(name)
	if !ok {
		return def
	}
	var out []string
	for item := range strings.SplitSeq(v, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// URLs returns a comma-separated list of absolute http(s) URLs.
func (l *Loader) URLs(name string, def []string) []*url.URL {
	var out []*url.URL
	for _, s := range l.List(name, def) {
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			l.Errorf(name, "%q is not an http(s) URL", s)
			continue
		}
		out = append(out, u)
	}
	return out
}

// Addr returns a listen address. A bare port ("8080") becomes ":8080".
func (l *Loader) Addr(name, def string) string {
	v := l.String(name, def)
	if _, err := strconv.Atoi(v); err == nil {
		v = ":" + v
	}
	if _, port, err := net.SplitHostPort(v); err != nil {
		l.Errorf(name, "%q is not a host:port or port", v)
	} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
		l.Errorf(name, "%q has an invalid port", v)
	}
	return v
}

// File returns a path that must exist and be readable when set (or when
// required).
func (l *Loader) File(name, def string, required bool) string {
	v := l.String(name, def)
	if v == "" {
		if required {
			l.Errorf(name, "is required")
		}
		return ""
	}
	f, err := os.Open(v)
	if err != nil {
		l.Errorf(name, "cannot read %s: %v", v, errors.Unwrap(err))
		return v
	}
	f.Close()
	return v
}

// Err returns every recorded problem in one error, or nil.
func (l *Loader) Err() error {
	if len(l.errs) == 0 {
		return nil
	}
	return fmt.Errorf("invalid configuration: %s", strings.Join(l.errs, "; "))
}
