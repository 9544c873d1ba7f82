package edge

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/edge/certstore"
	"github.com/zeitwork/zeitwork/internal/edge/routetable"
	"github.com/zeitwork/zeitwork/internal/envconfig"
)

// ACMEConfig enables on-demand certificates for verified customer domains.
type ACMEConfig struct {
	DirectoryURL string // empty disables ACME
	Email        string
	CARoot       string // extra trusted root for the ACME server (tests: Pebble)
	DatabaseURL  string // certificate storage shared by all edges
	HTTPPort     int    // port the ACME server validates HTTP-01 on (default 80; the LB forwards 80 → 8083)
	TLSPort      int    // port for TLS-ALPN-01 (default 443)
}

// Enabled reports whether ACME is configured.
func (c ACMEConfig) Enabled() bool { return c.DirectoryURL != "" }

func loadACME(l *envconfig.Loader) ACMEConfig {
	c := ACMEConfig{
		DirectoryURL: l.String("ACME_DIRECTORY_URL", ""),
		Email:        l.String("ACME_EMAIL", ""),
		CARoot:       l.File("ACME_CA_ROOT", "", false),
		DatabaseURL:  l.String("DATABASE_URL", ""),
		HTTPPort:     l.Int("ACME_HTTP_PORT", 80, 1, 65535),
		TLSPort:      l.Int("ACME_TLS_PORT", 443, 1, 65535),
	}
	if c.DirectoryURL != "" && c.DatabaseURL == "" {
		l.Errorf("DATABASE_URL", "is required with ACME_DIRECTORY_URL (certificates are shared through PostgreSQL)")
	}
	return c
}

type acmeManager struct {
	cfg    *certmagic.Config
	issuer *certmagic.ACMEIssuer
	cache  *certmagic.Cache
	routes *routetable.Client
}

// newACME sets up certmagic: storage in PostgreSQL, on-demand issuance
// only for custom domains present in the route table (which lists only
// verified ones). count is called with "obtained" or "failed" at the end
// of every certificate order (first issue or renewal).
func newACME(ctx context.Context, c ACMEConfig, routes *routetable.Client, log *slog.Logger, count func(result string)) (*acmeManager, error) {
	pool, err := db.Open(ctx, c.DatabaseURL)
	if err != nil {
		return nil, err
	}
	var roots *x509.CertPool
	if c.CARoot != "" {
		pem, err := os.ReadFile(c.CARoot)
		if err != nil {
			return nil, err
		}
		roots, _ = x509.SystemCertPool()
		if roots == nil {
			roots = x509.NewCertPool()
		}
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ACME_CA_ROOT %s holds no certificate", c.CARoot)
		}
	}
	var cache *certmagic.Cache
	var cfg *certmagic.Config
	cache = certmagic.NewCache(certmagic.CacheOptions{GetConfigForCert: func(certmagic.Certificate) (*certmagic.Config, error) { return cfg, nil }})
	cfg = certmagic.New(cache, certmagic.Config{
		Storage: &certstore.Store{Pool: pool},
		Logger:  zap.NewNop(),
		OnEvent: func(_ context.Context, event string, _ map[string]any) error {
			switch event {
			case "cert_obtained":
				count("obtained")
			case "cert_failed":
				count("failed")
			}
			return nil
		},
		OnDemand: &certmagic.OnDemandConfig{DecisionFunc: func(ctx context.Context, name string) error {
			r := routes.Table().Lookup(strings.ToLower(name))
			if r == nil || r.Kind != "custom" {
				return fmt.Errorf("%s is not a verified custom domain", name)
			}
			return nil
		}},
	})
	issuer := certmagic.NewACMEIssuer(cfg, certmagic.ACMEIssuer{
		CA: c.DirectoryURL, TestCA: c.DirectoryURL, Email: c.Email, Agreed: true, TrustedRoots: roots,
		AltHTTPPort: c.HTTPPort, AltTLSALPNPort: c.TLSPort, Logger: zap.NewNop(),
	})
	cfg.Issuers = []certmagic.Issuer{issuer}
	go func() { <-ctx.Done(); cache.Stop(); pool.Close() }() // owned by ctx
	log.Info("ACME on demand for verified custom domains", "directory", c.DirectoryURL)
	return &acmeManager{cfg: cfg, issuer: issuer, cache: cache, routes: routes}, nil
}

// earliestExpiry is the NotAfter of the cached ACME certificate of a
// custom domain in the route table that expires first.
func (a *acmeManager) earliestExpiry() (time.Time, bool) {
	var first time.Time
	for _, r := range a.routes.Table().Routes {
		if r.Kind != "custom" {
			continue
		}
		for _, c := range a.cache.AllMatchingCertificates(r.Host) {
			if c.Leaf != nil && (first.IsZero() || c.Leaf.NotAfter.Before(first)) {
				first = c.Leaf.NotAfter
			}
		}
	}
	return first, !first.IsZero()
}

func (a *acmeManager) GetCertificate(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return a.cfg.GetCertificate(h)
}

// HandleHTTPChallenge answers ACME HTTP-01 requests; it reports whether it
// did.
func (a *acmeManager) HandleHTTPChallenge(w http.ResponseWriter, r *http.Request) bool {
	return a.issuer.HandleHTTPChallenge(w, r)
}
