// Package h1 parses HTTP/1.1 message heads for the edge proxy's fast path,
// in place and without allocating.
//
// It is deliberately strict: ParseRequest accepts only the plain requests
// the fast path serves — a bodiless GET, HEAD or OPTIONS in origin form,
// exactly one valid Host, CRLF line ends, token header names, no framing,
// upgrade or expectation headers. Anything else, malformed or merely
// unusual, is reported as ErrNotPlain and the caller hands the connection
// to net/http, which answers it (a 400 for what is malformed). Everything
// ParseRequest accepts, net/http accepts with the same meaning (a
// differential fuzz test holds it to that).
//
// ParseResponse reads a node agent's response head; BodyReader then
// forwards its body verbatim while finding where it ends.
package h1

import (
	"bytes"
	"errors"
	"unsafe"
)

var (
	// ErrIncomplete: the buffer does not hold a whole head yet.
	ErrIncomplete = errors.New("h1: incomplete head")
	// ErrNotPlain: the request is not one the fast path serves.
	ErrNotPlain = errors.New("h1: not a plain request")
	// ErrMalformed: a response head or body framing that breaks the
	// protocol.
	ErrMalformed = errors.New("h1: malformed message")
)

// Header is one header line: Name as sent, Value without surrounding
// whitespace. Both alias the parsed buffer.
type Header struct {
	Name, Value []byte
	Kind        Kind
}

// Kind classifies the headers a proxy treats specially.
type Kind uint8

const (
	Other Kind = iota
	Host
	Connection
	ContentLength
	TransferEncoding
	HopByHop // Keep-Alive, Proxy-Connection, Proxy-Authenticate, Proxy-Authorization, TE, Upgrade
	Forwarded
	XForwardedFor
	XForwardedHost
	XForwardedProto
	XRealIP
	XRequestID
	Date
	Internal // X-Zeitwork-*: set by the edge only
	Expect
	Trailer // announces the trailers of a chunked body
)

// MaxHeaders bounds the header lines of one head.
const MaxHeaders = 100

// Request is a parsed request head.
type Request struct {
	Method, Target []byte
	Host           []byte
	Close          bool // Connection: close
	Headers        []Header
	hdrs           [32]Header
}

// ParseRequest parses the request head at the start of b into r and
// returns the head's length. It returns ErrIncomplete when b ends before
// the head does, and ErrNotPlain for any request it does not serve.
func ParseRequest(b []byte, r *Request) (int, error) {
	r.Method, r.Target, r.Host, r.Close = nil, nil, nil, false
	r.Headers = r.hdrs[:0]
	line, rest, err := nextLine(b)
	if err != nil {
		return 0, err
	}
	sp := bytes.IndexByte(line, ' ')
	if sp < 0 {
		return 0, ErrNotPlain
	}
	switch m := line[:sp]; string(m) {
	case "GET", "HEAD", "OPTIONS":
		r.Method = m
	default:
		return 0, ErrNotPlain
	}
	line = line[sp+1:]
	sp = bytes.IndexByte(line, ' ')
	if sp < 0 || string(line[sp+1:]) != "HTTP/1.1" || !validTarget(line[:sp]) {
		return 0, ErrNotPlain
	}
	r.Target = line[:sp]
	for {
		var h Header
		var end bool
		if h, rest, end, err = nextHeader(rest, len(r.Headers)); err != nil {
			return 0, err
		}
		if end {
			break
		}
		switch h.Kind {
		case Host:
			if r.Host != nil || !validHost(h.Value) {
				return 0, ErrNotPlain
			}
			r.Host = h.Value
		case Connection:
			switch {
			case equalFold(h.Value, "close"):
				r.Close = true
			case equalFold(h.Value, "keep-alive"):
			default:
				return 0, ErrNotPlain
			}
		case ContentLength, TransferEncoding, Expect:
			return 0, ErrNotPlain
		case HopByHop:
			if equalFold(h.Name, "upgrade") {
				return 0, ErrNotPlain
			}
		}
		r.Headers = append(r.Headers, h)
	}
	if r.Host == nil {
		return 0, ErrNotPlain
	}
	return len(b) - len(rest), nil
}

// Response is a parsed response head.
type Response struct {
	Status  int
	Reason  []byte
	Close   bool  // Connection: close
	Length  int64 // Content-Length, -1 when absent
	Chunked bool  // Transfer-Encoding: chunked
	Headers []Header
	hdrs    [32]Header
}

// ParseResponse parses the response head at the start of b into r and
// returns the head's length: ErrIncomplete when b ends before the head
// does, ErrMalformed for a head that breaks the protocol or is ambiguous
// about its body (both Content-Length and Transfer-Encoding, conflicting
// lengths, a transfer coding other than chunked).
func ParseResponse(b []byte, r *Response) (int, error) {
	r.Status, r.Reason, r.Close, r.Length, r.Chunked = 0, nil, false, -1, false
	r.Headers = r.hdrs[:0]
	line, rest, err := nextLine(b)
	if errors.Is(err, ErrNotPlain) {
		return 0, ErrMalformed
	} else if err != nil {
		return 0, err
	}
	if len(line) < 12 || string(line[:9]) != "HTTP/1.1 " || (len(line) > 12 && line[12] != ' ') {
		return 0, ErrMalformed
	}
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return 0, ErrMalformed
		}
		r.Status = r.Status*10 + int(c-'0')
	}
	if r.Status < 100 {
		return 0, ErrMalformed
	}
	if len(line) > 12 {
		r.Reason = line[13:]
		if !validValue(r.Reason) {
			return 0, ErrMalformed
		}
	}
	for {
		var h Header
		var end bool
		h, rest, end, err = nextHeader(rest, len(r.Headers))
		if errors.Is(err, ErrNotPlain) {
			return 0, ErrMalformed
		} else if err != nil {
			return 0, err
		}
		if end {
			break
		}
		switch h.Kind {
		case ContentLength:
			n, ok := parseLength(h.Value)
			if !ok || (r.Length >= 0 && r.Length != n) {
				return 0, ErrMalformed
			}
			r.Length = n
			continue
		case TransferEncoding:
			if r.Chunked || !equalFold(h.Value, "chunked") {
				return 0, ErrMalformed
			}
			r.Chunked = true
			continue
		case Connection:
			for _, opt := range bytes.Split(h.Value, []byte(",")) {
				if equalFold(bytes.Trim(opt, " \t"), "close") {
					r.Close = true
				}
			}
			continue
		}
		r.Headers = append(r.Headers, h)
	}
	if r.Chunked && r.Length >= 0 {
		return 0, ErrMalformed
	}
	return len(b) - len(rest), nil
}

// BodyLess reports whether a response to method with this status has no
// body, whatever its headers say.
func (r *Response) BodyLess(head bool) bool {
	return head || r.Status < 200 || r.Status == 204 || r.Status == 304
}

// nextLine splits off the CRLF-terminated line at the start of b. A bare
// LF or CR, or a control character, is ErrNotPlain.
func nextLine(b []byte) (line, rest []byte, err error) {
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		if len(b) > 0 && bytes.IndexByte(b[:len(b)-1], '\r') >= 0 {
			return nil, nil, ErrNotPlain // a CR not followed by LF
		}
		return nil, nil, ErrIncomplete
	}
	if i == 0 || b[i-1] != '\r' {
		return nil, nil, ErrNotPlain
	}
	line = b[:i-1]
	if bytes.IndexByte(line, '\r') >= 0 {
		return nil, nil, ErrNotPlain
	}
	return line, b[i+1:], nil
}

// nextHeader reads the header line at the start of b, the head's n+1th:
// end at the empty line that closes the head, ErrNotPlain for a line that
// is not a valid header or one past MaxHeaders, ErrIncomplete as nextLine.
func nextHeader(b []byte, n int) (h Header, rest []byte, end bool, err error) {
	line, rest, err := nextLine(b)
	if err != nil {
		return Header{}, nil, false, err
	}
	if len(line) == 0 {
		return Header{}, rest, true, nil
	}
	h, ok := parseHeader(line)
	if !ok || n == MaxHeaders {
		return Header{}, nil, false, ErrNotPlain
	}
	return h, rest, false, nil
}

// parseHeader splits "Name: value" with a token name, the colon right
// after it, and a value of visible characters, spaces and tabs (obs-text
// allowed), trimmed. A line that starts with whitespace (obsolete line
// folding) is refused.
func parseHeader(line []byte) (Header, bool) {
	colon := bytes.IndexByte(line, ':')
	if colon <= 0 {
		return Header{}, false
	}
	name := line[:colon]
	for _, c := range name {
		if !isTchar(c) {
			return Header{}, false
		}
	}
	v := line[colon+1:]
	for len(v) > 0 && (v[0] == ' ' || v[0] == '\t') {
		v = v[1:]
	}
	for len(v) > 0 && (v[len(v)-1] == ' ' || v[len(v)-1] == '\t') {
		v = v[:len(v)-1]
	}
	if !validValue(v) {
		return Header{}, false
	}
	return Header{Name: name, Value: v, Kind: kindOf(name)}, true
}

var kinds = map[string]Kind{
	"host": Host, "connection": Connection, "content-length": ContentLength, "transfer-encoding": TransferEncoding,
	"keep-alive": HopByHop, "proxy-connection": HopByHop, "te": HopByHop, "upgrade": HopByHop, "trailer": Trailer,
	"proxy-authenticate": HopByHop, "proxy-authorization": HopByHop,
	"forwarded": Forwarded, "x-forwarded-for": XForwardedFor, "x-forwarded-host": XForwardedHost,
	"x-forwarded-proto": XForwardedProto, "x-real-ip": XRealIP, "x-request-id": XRequestID, "date": Date, "expect": Expect,
}

// kindOf classifies a header name, ignoring case, without allocating.
func kindOf(name []byte) Kind {
	if len(name) > 11 && equalFold(name[:11], "x-zeitwork-") {
		return Internal
	}
	var low [len("proxy-authorization")]byte // the longest name in kinds
	if len(name) > len(low) {
		return Other
	}
	for i, c := range name {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		low[i] = c
	}
	return kinds[string(low[:len(name)])] // Other when absent
}

// validTarget accepts an origin-form target ("/" path ["?" query]) of
// visible ASCII without '#', whose percent escapes are well formed.
func validTarget(t []byte) bool {
	if len(t) == 0 || t[0] != '/' {
		return false
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		if c <= ' ' || c >= 0x7f || c == '#' {
			return false
		}
		if c == '%' {
			if i+2 >= len(t) || !isHex(t[i+1]) || !isHex(t[i+2]) {
				return false
			}
		}
	}
	return true
}

// validHost accepts a host name or IPv4 address with an optional port, or
// a bracketed IPv6 address with an optional port, made of letters, digits
// and "-._~".
func validHost(h []byte) bool {
	if len(h) == 0 {
		return false
	}
	if h[0] == '[' {
		end := bytes.IndexByte(h, ']')
		if end < 0 {
			return false
		}
		for _, c := range h[1:end] {
			if !isHex(c) && c != ':' && c != '.' {
				return false
			}
		}
		h = h[end+1:]
		if len(h) == 0 {
			return true
		}
		if h[0] != ':' {
			return false
		}
		return validPort(h[1:])
	}
	if i := bytes.IndexByte(h, ':'); i >= 0 {
		if !validPort(h[i+1:]) {
			return false
		}
		h = h[:i]
	}
	if len(h) == 0 {
		return false
	}
	for _, c := range h {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~') {
			return false
		}
	}
	return true
}

func validPort(p []byte) bool {
	if len(p) == 0 || len(p) > 5 {
		return false
	}
	for _, c := range p {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// validValue accepts field content: HTAB, SP, visible ASCII, obs-text.
func validValue(v []byte) bool {
	for _, c := range v {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// isTchar reports whether c may appear in a token (RFC 9110 §5.6.2).
func isTchar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '!', '#', '$', '%', '&', '\'', '*', '+', '-', '.', '^', '_', '`', '|', '~':
		return true
	}
	return false
}

// equalFold compares b with the lower-case ASCII string s, ignoring case.
func equalFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}

// ValidTarget reports whether t is an origin-form target of visible
// ASCII, as ParseRequest accepts it (for an HTTP/2 :path forwarded in an
// HTTP/1.1 request line).
func ValidTarget(t string) bool { return validTarget(unsafe.Slice(unsafe.StringData(t), len(t))) }

// ValidHost reports whether h is a host[:port] as ParseRequest accepts it
// in Host (for an HTTP/2 :authority).
func ValidHost(h string) bool { return validHost(unsafe.Slice(unsafe.StringData(h), len(h))) }

// KindOf classifies a header name, ignoring case.
func KindOf(name string) Kind { return kindOf(unsafe.Slice(unsafe.StringData(name), len(name))) }
