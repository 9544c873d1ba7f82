package h1

import (
	"bufio"
	"errors"
	"io"
)

// ForwardBody copies a message body from src to dst verbatim and returns
// the bytes written: length bytes when length ≥ 0; with chunked, the
// chunked framing through the last chunk and the trailers (validated as
// it passes, so the end is found and a connection can be reused);
// otherwise everything until src ends. flush.Flush runs before every read
// that would wait for the network (src has nothing buffered), so a stream
// reaches dst as it comes. buf is scratch space for reads that bypass
// src's buffer (made when needed if empty; a body already in src's
// buffer needs none).
func ForwardBody(dst io.Writer, src *bufio.Reader, length int64, chunked bool, flush Flusher, buf []byte) (int64, error) {
	if chunked {
		return forwardChunked(dst, src, flush, buf)
	}
	var written int64
	for length < 0 || written < length {
		if n := src.Buffered(); n > 0 { // straight from src's buffer
			if length >= 0 {
				n = int(min(int64(n), length-written))
			}
			b, _ := src.Peek(n)
			if _, err := dst.Write(b); err != nil {
				return written, err
			}
			_, _ = src.Discard(n)
			written += int64(n)
			continue
		}
		if err := flush.Flush(); err != nil {
			return written, err
		}
		if len(buf) == 0 {
			buf = make([]byte, 32<<10)
		}
		p := buf
		if length >= 0 && int64(len(p)) > length-written {
			p = p[:length-written]
		}
		n, err := src.Read(p)
		if n > 0 {
			if _, werr := dst.Write(p[:n]); werr != nil {
				return written, werr
			}
			written += int64(n)
		}
		if err == io.EOF && length < 0 {
			return written, nil
		}
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return written, err
		}
	}
	return written, nil
}

// maxChunkLine bounds a chunk-size line or a trailer line.
const maxChunkLine = 4 << 10

// Flusher pushes out what was written so far (a *bufio.Writer).
type Flusher interface{ Flush() error }

func forwardChunked(dst io.Writer, src *bufio.Reader, flush Flusher, buf []byte) (int64, error) {
	var written int64
	line := func() ([]byte, error) {
		if src.Buffered() == 0 {
			if err := flush.Flush(); err != nil {
				return nil, err
			}
		}
		l, err := src.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) || len(l) > maxChunkLine {
			return nil, ErrMalformed
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return nil, err
		}
		if len(l) < 2 || l[len(l)-2] != '\r' {
			return nil, ErrMalformed
		}
		return l, nil
	}
	write := func(b []byte) error {
		n, err := dst.Write(b)
		written += int64(n)
		return err
	}
	for {
		l, err := line()
		if err != nil {
			return written, err
		}
		size, ok := ParseChunkSize(l[:len(l)-2])
		if !ok {
			return written, ErrMalformed
		}
		if err := write(l); err != nil {
			return written, err
		}
		if size == 0 {
			break
		}
		n, err := ForwardBody(dst, src, size, false, flush, buf)
		written += n
		if err != nil {
			return written, err
		}
		crlf, err := line()
		if err != nil {
			return written, err
		}
		if len(crlf) != 2 {
			return written, ErrMalformed
		}
		if err := write(crlf); err != nil {
			return written, err
		}
	}
	// Trailers, then the empty line.
	for range MaxHeaders + 1 {
		l, err := line()
		if err != nil {
			return written, err
		}
		if len(l) > 2 {
			if _, ok := parseHeader(l[:len(l)-2]); !ok {
				return written, ErrMalformed
			}
		}
		if err := write(l); err != nil {
			return written, err
		}
		if len(l) == 2 {
			return written, nil
		}
	}
	return written, ErrMalformed
}

// ParseChunkSize parses a chunk-size line without its CRLF: 1 to 15 hex
// digits, optionally followed by chunk extensions (";" and field content).
func ParseChunkSize(l []byte) (int64, bool) {
	var n int64
	i := 0
	for ; i < len(l) && isHex(l[i]); i++ {
		if i == 15 {
			return 0, false
		}
		c := l[i]
		switch {
		case c >= 'a':
			c -= 'a' - 10
		case c >= 'A':
			c -= 'A' - 10
		default:
			c -= '0'
		}
		n = n<<4 | int64(c)
	}
	if i == 0 {
		return 0, false
	}
	rest := l[i:]
	for len(rest) > 0 && (rest[0] == ' ' || rest[0] == '\t') {
		rest = rest[1:]
	}
	if len(rest) > 0 && (rest[0] != ';' || !validValue(rest)) {
		return 0, false
	}
	return n, true
}
