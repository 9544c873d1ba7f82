package devcluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// CA is the development certificate authority that issues the edge proxy's
// wildcard certificate for the apps domain, and server certificates for
// other services of a development layout (Issue).
type CA struct {
	CertFile string // CA certificate (PEM); pass to curl --cacert
	KeyFile  string // its private key (PEM, 0600)
	// WildcardCert and WildcardKey are *.<domain> + <domain>, for
	// SSL_CERT_PATH / SSL_KEY_PATH.
	WildcardCert, WildcardKey string
}

// EnsureCA creates (or reuses) a CA in dir and a wildcard certificate for
// domain signed by it.
func EnsureCA(dir, domain string) (*CA, error) {
	ca := &CA{
		CertFile:     filepath.Join(dir, "ca.pem"),
		KeyFile:      filepath.Join(dir, "ca-key.pem"),
		WildcardCert: filepath.Join(dir, "wildcard.pem"),
		WildcardKey:  filepath.Join(dir, "wildcard-key.pem"),
	}
	if fileExists(ca.CertFile) && fileExists(ca.KeyFile) && fileExists(ca.WildcardCert) && fileExists(ca.WildcardKey) {
		return ca, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Zeitwork development CA", Organization: []string{"Zeitwork dev"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(5, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("cannot create dev CA: %w", err)
	}
	caKeyDER, err := x509.MarshalECPrivateKey(caKey)
	if err != nil {
		return nil, err
	}
	err = errors.Join(
		writePEM(ca.CertFile, "CERTIFICATE", caDER, 0o644),
		writePEM(ca.KeyFile, "EC PRIVATE KEY", caKeyDER, 0o600),
	)
	if err != nil {
		return nil, err
	}
	if err := ca.Issue(ca.WildcardCert, ca.WildcardKey, []string{"*." + domain, domain}, []net.IP{net.IPv4(127, 0, 0, 1)}); err != nil {
		return nil, fmt.Errorf("cannot issue wildcard certificate: %w", err)
	}
	return ca, nil
}

// Issue writes a server certificate for names and ips, signed by the CA
// and valid for a year, to certFile, and its key to keyFile (0600).
func (ca *CA) Issue(certFile, keyFile string, names []string, ips []net.IP) error {
	caCert, caKey, err := ca.load()
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	leaf := &x509.Certificate{
		SerialNumber: serial(),
		DNSNames:     names,
		IPAddresses:  ips,
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if len(names) > 0 {
		leaf.Subject = pkix.Name{CommonName: names[0]}
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return errors.Join(
		writePEM(certFile, "CERTIFICATE", leafDER, 0o644),
		writePEM(keyFile, "EC PRIVATE KEY", keyDER, 0o600),
	)
}

// load reads the CA's certificate and key.
func (ca *CA) load() (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err := os.ReadFile(ca.CertFile)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := os.ReadFile(ca.KeyFile)
	if err != nil {
		return nil, nil, err
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, nil, fmt.Errorf("%s or %s is not PEM", ca.CertFile, ca.KeyFile)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", ca.CertFile, err)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", ca.KeyFile, err)
	}
	return cert, key, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
