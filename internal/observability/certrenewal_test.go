package observability

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Where the certificate renewal test runs its edge proxy.
const renewIP = "127.0.7.20"

// TestCertificateRenewal runs the certificate renewal runbook against a
// real edge proxy binary: the wildcard certificate replaced on disk (new
// files renamed into place, key first) is served to new connections within
// the edge's 5 s check, the expiry gauge moves with it, and a connection
// opened before keeps working. On SIGHUP the edge reloads at once, and a
// pair that does not load (key of another certificate) is refused with
// the previous one kept.
func TestCertificateRenewal(t *testing.T) {
	if testing.Short() {
		t.Skip("starts an edge proxy")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the renewal test binds :443 and needs root on CI")
		}
		t.Skip("binds :443; needs root")
	}
	bin := binDir(t)
	dir := t.TempDir()
	ca := newTestCA(t)
	certFile, keyFile := filepath.Join(dir, "wildcard.crt"), filepath.Join(dir, "wildcard.key")
	first := ca.issue(t, 10*24*time.Hour)
	first.install(t, certFile, keyFile)

	cmd := exec.Command(filepath.Join(bin, "zeitwork-edge-proxy"))
	logFile, err := os.Create(filepath.Join(dir, "edge.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = append(os.Environ(), "HTTPS_ADDR="+renewIP+":443", "HTTP_ADDR="+renewIP+":8083", "APPS_DOMAIN=renew.test",
		"SSL_CERT_PATH="+certFile, "SSL_KEY_PATH="+keyFile, "STATE_DIR="+filepath.Join(dir, "state"), "ACCESS_LOG=false", "OPERATOR_URL=")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logFile.Name())
			t.Logf("edge log:\n%s", b)
		}
	})
	metrics := "http://" + renewIP + ":8083/metrics"
	eventually(t, "the edge to serve", 30*time.Second, func() error { _, err := get(t.Context(), metrics); return err })

	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	served := func() *big.Int {
		t.Helper()
		c, err := tls.Dial("tcp", renewIP+":443", &tls.Config{ServerName: "app.renew.test", RootCAs: roots, NextProtos: []string{"http/1.1"}})
		if err != nil {
			t.Fatalf("TLS handshake: %v", err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].SerialNumber
	}
	expiry := func() time.Duration {
		b, err := get(t.Context(), metrics)
		if err != nil {
			return 0
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, `zeitwork_edge_proxy_certificate_expiry_seconds{name="wildcard"}`) {
				f := strings.Fields(l)
				v, _ := strconv.ParseFloat(f[len(f)-1], 64)
				return time.Duration(v * float64(time.Second))
			}
		}
		return 0
	}
	if s := served(); s.Cmp(first.serial) != 0 {
		t.Fatalf("serves serial %s, want %s", s, first.serial)
	}
	if e := expiry(); e < 9*24*time.Hour || e > 10*24*time.Hour {
		t.Fatalf("expiry gauge %s, want about 10 days", e)
	}

	// A client connected before the renewal, with a request in between.
	old, err := tls.Dial("tcp", renewIP+":443", &tls.Config{ServerName: "app.renew.test", RootCAs: roots, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	oldReader := bufio.NewReader(old)
	request := func() error {
		if _, err := fmt.Fprintf(old, "GET /health HTTP/1.1\r\nHost: app.renew.test\r\n\r\n"); err != nil {
			return err
		}
		resp, err := http.ReadResponse(oldReader, nil)
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	}
	if err := request(); err != nil {
		t.Fatal(err)
	}

	// Renewal on disk: picked up by the periodic check.
	second := ca.issue(t, 90*24*time.Hour)
	start := time.Now()
	second.install(t, certFile, keyFile)
	eventually(t, "the renewed certificate served", 15*time.Second, func() error {
		if s := served(); s.Cmp(second.serial) != 0 {
			return fmt.Errorf("still serial %s", s)
		}
		return nil
	})
	t.Logf("renewed certificate served %s after the files were replaced", time.Since(start).Round(100*time.Millisecond))
	if e := expiry(); e < 89*24*time.Hour || e > 90*24*time.Hour {
		t.Fatalf("expiry gauge %s after the renewal, want about 90 days", e)
	}
	if err := request(); err != nil {
		t.Fatalf("the connection opened before the renewal: %v", err)
	}

	// SIGHUP reloads at once; a broken pair is refused.
	third := ca.issue(t, 60*24*time.Hour)
	third.install(t, certFile, keyFile)
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the certificate reloaded on SIGHUP", 2*time.Second, func() error {
		if s := served(); s.Cmp(third.serial) != 0 {
			return fmt.Errorf("still serial %s", s)
		}
		return nil
	})
	broken := ca.issue(t, 30*24*time.Hour)
	broken.key = ca.issue(t, 30*24*time.Hour).key // does not match the certificate
	broken.install(t, certFile, keyFile)
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the refused reload logged", 10*time.Second, func() error {
		b, _ := os.ReadFile(logFile.Name())
		if !strings.Contains(string(b), "certificate reload failed; keeping the previous one") {
			return fmt.Errorf("not logged")
		}
		return nil
	})
	time.Sleep(6 * time.Second) // one more periodic check
	if s := served(); s.Cmp(third.serial) != 0 {
		t.Fatalf("after a broken pair the edge serves %s, want the previous %s", s, third.serial)
	}
	if e := expiry(); e < 59*24*time.Hour || e > 60*24*time.Hour {
		t.Fatalf("expiry gauge %s after a refused reload, want the previous certificate's 60 days", e)
	}
	if err := request(); err != nil {
		t.Fatalf("the connection opened before the renewals: %v", err)
	}
}

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

type testPair struct {
	serial  *big.Int
	certPEM []byte
	key     *ecdsa.PrivateKey
}

func newTestCA(t *testing.T) *testCA {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "renewal test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key}
}

// issue makes a *.renew.test certificate valid for the given time from now.
func (ca *testCA) issue(t *testing.T, valid time.Duration) *testPair {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: "*.renew.test"}, DNSNames: []string{"*.renew.test"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(valid), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return &testPair{serial: serial, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), key: key}
}

// install writes the pair next to the live files and renames it into
// place, key first, as the runbook says.
func (p *testPair) install(t *testing.T, certFile, keyFile string) {
	der, err := x509.MarshalECPrivateKey(p.key)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		path string
		data []byte
	}{{keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})}, {certFile, p.certPEM}} {
		if err := os.WriteFile(f.path+".new", f.data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(f.path+".new", f.path); err != nil {
			t.Fatal(err)
		}
	}
}
