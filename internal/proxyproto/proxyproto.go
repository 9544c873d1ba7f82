// Package proxyproto reads and writes the PROXY protocol (versions 1 and 2,
// https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt) that carries
// a client's address from a TCP load balancer to the server behind it.
package proxyproto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Command is the v2 command: LOCAL (health checks from the proxy itself) or
// PROXY (a relayed connection).
type Command byte

// Commands.
const (
	Local Command = 0x0
	Proxy Command = 0x1
)

// Header is one PROXY protocol header.
type Header struct {
	Version int // 1 or 2
	Command Command
	// Source and Destination are nil for LOCAL and UNKNOWN headers.
	Source, Destination *net.TCPAddr
}

// v2Signature starts every version 2 header.
var v2Signature = []byte("\r\n\r\n\x00\r\nQUIT\n")

// ErrNoHeader means the stream does not start with a PROXY header.
var ErrNoHeader = errors.New("no PROXY protocol header")

const (
	v1MaxLen = 107
	// v2MaxLen bounds the TLV area we accept (the protocol allows 64 KiB).
	v2MaxLen = 16 + 2048
)

// Format encodes h in its version (v1 text when Version is 1, v2 otherwise).
func (h *Header) Format() []byte {
	if h.Command == Local || h.Source == nil || h.Destination == nil {
		if h.Version == 1 {
			return []byte("PROXY UNKNOWN\r\n")
		}
		return append(slices.Clone(v2Signature), 0x20, 0x00, 0x00, 0x00)
	}
	return AppendProxy(nil, h.Version, addrPort(h.Source), addrPort(h.Destination))
}

// AppendProxy appends the PROXY header (v1 text when version is 1, v2
// otherwise) of a relayed TCP connection from src to dst.
func AppendProxy(b []byte, version int, src, dst netip.AddrPort) []byte {
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if version == 1 {
		return appendV1(b, src, dst)
	}
	return appendV2(b, src, dst)
}

func appendV1(b []byte, src, dst netip.AddrPort) []byte {
	fam := "TCP4"
	if !src.Addr().Is4() || !dst.Addr().Is4() {
		fam = "TCP6"
		src = netip.AddrPortFrom(netip.AddrFrom16(src.Addr().As16()), src.Port())
		dst = netip.AddrPortFrom(netip.AddrFrom16(dst.Addr().As16()), dst.Port())
	}
	b = append(b, "PROXY "...)
	b = append(b, fam...)
	b = append(b, ' ')
	b = src.Addr().AppendTo(b)
	b = append(b, ' ')
	b = dst.Addr().AppendTo(b)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(src.Port()), 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(dst.Port()), 10)
	return append(b, "\r\n"...)
}

func addrPort(a *net.TCPAddr) netip.AddrPort {
	ap := a.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func appendV2(b []byte, src, dst netip.AddrPort) []byte {
	b = append(b, v2Signature...)
	if src.Addr().Is4() && dst.Addr().Is4() {
		b = append(b, 0x21, 0x11, 0x00, 12)
		s4, d4 := src.Addr().As4(), dst.Addr().As4()
		b = append(b, s4[:]...)
		b = append(b, d4[:]...)
	} else {
		b = append(b, 0x21, 0x21, 0x00, 36)
		s16, d16 := src.Addr().As16(), dst.Addr().As16()
		b = append(b, s16[:]...)
		b = append(b, d16[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}

// Read parses a v1 or v2 header from r. It returns ErrNoHeader, without
// consuming anything, when the stream does not start with one. It decides
// as soon as the bytes received so far cannot start a header, so a client
// whose first message is shorter than a signature is not kept waiting.
func Read(r *bufio.Reader) (*Header, error) {
	first, err := r.Peek(1)
	if err != nil {
		return nil, err
	}
	switch first[0] {
	case 'P':
		if err := expect(r, v1Prefix); err != nil {
			return nil, err
		}
		return readV1(r)
	case '\r':
		if err := expect(r, v2Signature); err != nil {
			return nil, err
		}
		return readV2(r)
	}
	return nil, ErrNoHeader
}

var v1Prefix = []byte("PROXY ")

// expect waits until r's buffered bytes either start with sig (nil) or
// cannot (ErrNoHeader). It consumes nothing.
func expect(r *bufio.Reader, sig []byte) error {
	n := max(r.Buffered(), 1)
	for {
		p, err := r.Peek(min(n, len(sig)))
		if !bytes.HasPrefix(sig, p) {
			return ErrNoHeader
		}
		if len(p) == len(sig) {
			return nil
		}
		if err != nil {
			return ErrNoHeader // EOF or timeout inside the signature: plain data
		}
		n = max(r.Buffered(), len(p)) + 1
	}
}

func readV1(r *bufio.Reader) (*Header, error) {
	var line []byte
	for len(line) < v1MaxLen {
		c, err := r.ReadByte()
		if err != nil {
			return nil, fmt.Errorf("proxy v1: truncated header: %w", err)
		}
		line = append(line, c)
		if c == '\n' {
			break
		}
	}
	if !bytes.HasSuffix(line, []byte("\r\n")) {
		return nil, errors.New("proxy v1: header longer than 107 bytes or not CRLF-terminated")
	}
	fields := strings.Split(string(line[:len(line)-2]), " ")
	if len(fields) >= 2 && fields[1] == "UNKNOWN" {
		return &Header{Version: 1, Command: Local}, nil
	}
	if len(fields) != 6 {
		return nil, fmt.Errorf("proxy v1: want 6 fields, got %d", len(fields))
	}
	if fields[1] != "TCP4" && fields[1] != "TCP6" {
		return nil, fmt.Errorf("proxy v1: unknown protocol %q", fields[1])
	}
	src, err1 := parseV1Addr(fields[2], fields[4], fields[1])
	dst, err2 := parseV1Addr(fields[3], fields[5], fields[1])
	if err := errors.Join(err1, err2); err != nil {
		return nil, err
	}
	return &Header{Version: 1, Command: Proxy, Source: src, Destination: dst}, nil
}

func parseV1Addr(ip, port, fam string) (*net.TCPAddr, error) {
	a, err := netip.ParseAddr(ip)
	if err != nil || a.Zone() != "" {
		return nil, fmt.Errorf("proxy v1: bad address %q", ip)
	}
	if (fam == "TCP4") != a.Is4() {
		return nil, fmt.Errorf("proxy v1: address %q does not match %s", ip, fam)
	}
	if len(port) == 0 || len(port) > 5 || (len(port) > 1 && port[0] == '0') {
		return nil, fmt.Errorf("proxy v1: bad port %q", port)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("proxy v1: bad port %q", port)
	}
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, uint16(p))), nil
}

func readV2(r *bufio.Reader) (*Header, error) {
	var fixed [16]byte
	if _, err := ioReadFull(r, fixed[:]); err != nil {
		return nil, fmt.Errorf("proxy v2: truncated header: %w", err)
	}
	verCmd, fam := fixed[12], fixed[13]
	length := int(binary.BigEndian.Uint16(fixed[14:16]))
	if verCmd>>4 != 2 {
		return nil, fmt.Errorf("proxy v2: bad version %d", verCmd>>4)
	}
	cmd := Command(verCmd & 0x0f)
	if cmd != Local && cmd != Proxy {
		return nil, fmt.Errorf("proxy v2: bad command %d", cmd)
	}
	if length > v2MaxLen {
		return nil, fmt.Errorf("proxy v2: header of %d bytes is too long", length)
	}
	body := make([]byte, length)
	if _, err := ioReadFull(r, body); err != nil {
		return nil, fmt.Errorf("proxy v2: truncated address block: %w", err)
	}
	h := &Header{Version: 2, Command: cmd}
	if cmd == Local {
		return h, nil
	}
	switch fam {
	case 0x11: // TCP over IPv4
		if length < 12 {
			return nil, fmt.Errorf("proxy v2: IPv4 block of %d bytes", length)
		}
		h.Source = tcpAddr(body[0:4], body[8:10])
		h.Destination = tcpAddr(body[4:8], body[10:12])
		return h, checkTLVs(body[12:])
	case 0x21: // TCP over IPv6
		if length < 36 {
			return nil, fmt.Errorf("proxy v2: IPv6 block of %d bytes", length)
		}
		h.Source = tcpAddr(body[0:16], body[32:34])
		h.Destination = tcpAddr(body[16:32], body[34:36])
		return h, checkTLVs(body[36:])
	case 0x00: // UNSPEC: keep the connection's own addresses
		h.Command = Local
		return h, nil
	}
	return nil, fmt.Errorf("proxy v2: unsupported address family/protocol 0x%02x", fam)
}

// checkTLVs validates the length structure of the TLV area (values are
// skipped).
func checkTLVs(b []byte) error {
	for len(b) > 0 {
		if len(b) < 3 {
			return errors.New("proxy v2: truncated TLV")
		}
		n := int(binary.BigEndian.Uint16(b[1:3]))
		if len(b) < 3+n {
			return errors.New("proxy v2: TLV longer than the header")
		}
		b = b[3+n:]
	}
	return nil
}

func tcpAddr(ip, port []byte) *net.TCPAddr {
	a, _ := netip.AddrFromSlice(ip)
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(a.Unmap(), binary.BigEndian.Uint16(port)))
}

func ioReadFull(r *bufio.Reader, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := r.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// ParseTrusted turns a list of IPs and CIDRs into a membership test.
func ParseTrusted(list []string) (func(net.IP) bool, error) {
	var prefixes []netip.Prefix
	var bad []string
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if p, err := netip.ParsePrefix(s); err == nil {
			prefixes = append(prefixes, p.Masked())
			continue
		}
		if a, err := netip.ParseAddr(s); err == nil {
			prefixes = append(prefixes, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		bad = append(bad, s)
	}
	if len(bad) > 0 {
		return nil, fmt.Errorf("not an IP or CIDR: %s", strings.Join(bad, ", "))
	}
	return func(ip net.IP) bool {
		a, ok := netip.AddrFromSlice(ip)
		if !ok {
			return false
		}
		a = a.Unmap()
		for _, p := range prefixes {
			if p.Contains(a) {
				return true
			}
		}
		return false
	}, nil
}
