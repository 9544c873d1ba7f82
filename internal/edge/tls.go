package edge

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"time"
)

// CertStore serves the static wildcard certificate and reloads it when the
// files change or on demand (SIGHUP).
type CertStore struct {
	certFile, keyFile string
	cert              atomic.Pointer[tls.Certificate]
	modTime           atomic.Int64
	onLoad            func(notAfter time.Time)
}

// NewCertStore loads the pair now.
func NewCertStore(certFile, keyFile string, onLoad func(time.Time)) (*CertStore, error) {
	c := &CertStore{certFile: certFile, keyFile: keyFile, onLoad: onLoad}
	if err := c.Reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload reads the files again; a bad pair keeps the previous one.
func (c *CertStore) Reload() error {
	pair, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("cannot load certificate %s: %w", c.certFile, err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return err
	}
	pair.Leaf = leaf
	c.cert.Store(&pair)
	if fi, err := os.Stat(c.certFile); err == nil {
		c.modTime.Store(fi.ModTime().UnixNano())
	}
	if c.onLoad != nil {
		c.onLoad(leaf.NotAfter)
	}
	return nil
}

// ChangedOnDisk reports whether the certificate file changed since the
// last load.
func (c *CertStore) ChangedOnDisk() bool {
	fi, err := os.Stat(c.certFile)
	return err == nil && fi.ModTime().UnixNano() != c.modTime.Load()
}

// Covers reports whether the static certificate is valid for host.
func (c *CertStore) Covers(host string) bool {
	cert := c.cert.Load()
	return cert != nil && cert.Leaf.VerifyHostname(host) == nil
}

// Get returns the current certificate.
func (c *CertStore) Get() *tls.Certificate { return c.cert.Load() }

// TLSConfig is the edge's TLS policy: TLS 1.2+, AEAD suites with forward
// secrecy, X25519/P-256, h2 and http/1.1 via ALPN, session tickets on.
// getCert picks the certificate by SNI.
func TLSConfig(getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error)) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
		CurvePreferences: []tls.CurveID{tls.X25519, tls.CurveP256},
		NextProtos:       []string{"h2", "http/1.1"},
		GetCertificate:   getCert,
	}
}

func lowerSNI(h *tls.ClientHelloInfo) string {
	return strings.TrimSuffix(strings.ToLower(h.ServerName), ".")
}
