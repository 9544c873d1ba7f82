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
// wildcard certificate for the apps domain.
type CA struct {
	CertFile string // CA certificate (PEM); pass to curl --cacert
	// WildcardCert and WildcardKey are *.<domain> + <domain>, for
	// SSL_CERT_PATH / SSL_KEY_PATH.
	WildcardCert, WildcardKey string
}

// EnsureCA creates (or reuses) a CA in dir and a wildcard certificate for
// domain signed by it.
func EnsureCA(dir, domain string) (*CA, error) {
	ca := &CA{
		CertFile:     filepath.Join(dir, "ca.pem"),
		WildcardCert: filepath.Join(dir, "wildcard.pem"),
		WildcardKey:  filepath.Join(dir, "wildcard-key.pem"),
	}
	if fileExists(ca.CertFile) && fileExists(ca.WildcardCert) && fileExists(ca.WildcardKey) {
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
	caCert, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	leaf := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "*." + domain},
		DNSNames:     []string{"*." + domain, domain},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("cannot issue wildcard certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	err = errors.Join(
		writePEM(ca.CertFile, "CERTIFICATE", caDER, 0o644),
		writePEM(ca.WildcardCert, "CERTIFICATE", leafDER, 0o644),
		writePEM(ca.WildcardKey, "EC PRIVATE KEY", keyDER, 0o600),
	)
	if err != nil {
		return nil, err
	}
	return ca, nil
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
