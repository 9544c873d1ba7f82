package secrets

import (
	"bytes"
	"encoding/base64"
	"strings"
	"testing"
)

const key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="

func TestSealer(t *testing.T) {
	for _, bad := range []string{"", "short", base64.StdEncoding.EncodeToString(make([]byte, 16)), "!!!"} {
		if _, err := NewSealer(bad); err == nil {
			t.Errorf("NewSealer(%q) accepted", bad)
		}
	}
	s, err := NewSealer(key)
	if err != nil {
		t.Fatal(err)
	}
	n1, c1 := s.Seal("p1", "DB_PASSWORD", "hunter2")
	n2, c2 := s.Seal("p1", "DB_PASSWORD", "hunter2")
	if bytes.Equal(n1, n2) || bytes.Equal(c1, c2) || bytes.Contains(c1, []byte("hunter2")) {
		t.Fatal("nonces repeat or plaintext visible")
	}
	if v, err := s.Open("p1", "DB_PASSWORD", n1, c1); err != nil || v != "hunter2" {
		t.Fatalf("Open = %q, %v", v, err)
	}
	// Bound to project and name; tampering is detected.
	for _, tc := range []struct{ p, n string }{{"p2", "DB_PASSWORD"}, {"p1", "OTHER"}} {
		if _, err := s.Open(tc.p, tc.n, n1, c1); err == nil {
			t.Errorf("ciphertext opened as %s/%s", tc.p, tc.n)
		}
	}
	c1[0] ^= 1
	if _, err := s.Open("p1", "DB_PASSWORD", n1, c1); err == nil {
		t.Error("tampered ciphertext opened")
	}
	other, _ := NewSealer(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32)))
	if _, err := other.Open("p1", "DB_PASSWORD", n2, c2); err == nil {
		t.Error("opened with another key")
	}
	if _, err := s.Open("p1", "DB_PASSWORD", []byte{1}, c2); err == nil {
		t.Error("opened with a short nonce")
	}
}

func TestToken(t *testing.T) {
	a, ha := NewToken()
	b, hb := NewToken()
	if a == b || !strings.HasPrefix(a, TokenPrefix) || len(a) != len(TokenPrefix)+48 {
		t.Fatalf("tokens %q %q", a, b)
	}
	if !bytes.Equal(ha, HashToken(a)) || bytes.Equal(ha, hb) || bytes.Contains(ha, []byte(a)) {
		t.Fatal("hash mismatch")
	}
}
