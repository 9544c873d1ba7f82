// Package pgtest gives each test its own fresh, migrated PostgreSQL
// database. The first call in a test binary starts a private server
// (embeddedpg, durability off) — or uses the server named by
// ZEITWORK_TEST_PG_URL, a superuser URL — migrates a template database once,
// and every test then gets `CREATE DATABASE … TEMPLATE` of it, dropped when
// the test ends. Tests can therefore run in parallel.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/embeddedpg"
)

const templateName = "zeitwork_template"

var (
	once     sync.Once
	adminURL string // superuser URL to the "postgres" database
	server   *embeddedpg.Server
	initErr  error
)

func setup() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if u := os.Getenv("ZEITWORK_TEST_PG_URL"); u != "" {
		adminURL = u
	} else {
		base := filepath.Join(os.TempDir(), "zeitwork-pgtest")
		if err := os.MkdirAll(base, 0o755); err != nil {
			initErr = err
			return
		}
		removeStale(base)
		dir := filepath.Join(base, strconv.Itoa(os.Getpid()))
		server, initErr = embeddedpg.Start(ctx, embeddedpg.Config{DataDir: filepath.Join(dir, "data"), Fast: true})
		if initErr != nil {
			return
		}
		adminURL = server.URL("postgres")
	}
	initErr = createTemplate(ctx)
}

// removeStale deletes data directories of test binaries that are gone.
func removeStale(base string) {
	entries, _ := os.ReadDir(base)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if syscall.Kill(pid, 0) == syscall.ESRCH {
			_ = os.RemoveAll(filepath.Join(base, e.Name()))
		}
	}
}

func createTemplate(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		return fmt.Errorf("cannot connect to test postgres: %w", err)
	}
	defer conn.Close(ctx)
	// Serialise template creation across test binaries sharing a server.
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(4242)"); err != nil {
		return err
	}
	defer conn.Exec(context.Background(), "SELECT pg_advisory_unlock(4242)")
	// Rebuild the template each run: migrations may have changed.
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+templateName+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("cannot drop old template: %w", err)
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+templateName); err != nil {
		return fmt.Errorf("cannot create template: %w", err)
	}
	pool, err := db.Open(ctx, withDatabase(adminURL, templateName))
	if err != nil {
		return err
	}
	_, err = db.Migrate(ctx, pool)
	pool.Close()
	if err != nil {
		return fmt.Errorf("cannot migrate template: %w", err)
	}
	return nil
}

func withDatabase(raw, name string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return raw
	}
	u.Path = "/" + name
	return u.String()
}

// AdminURL returns the superuser URL of the test server (database
// "postgres"), starting it if needed.
func AdminURL(t testing.TB) string {
	t.Helper()
	once.Do(setup)
	if initErr != nil {
		t.Fatalf("test database: %v", initErr)
	}
	return adminURL
}

// URL creates a fresh migrated database for this test and returns its URL.
// The database is dropped when the test ends.
func URL(t testing.TB) string {
	t.Helper()
	return create(t, "TEMPLATE "+templateName)
}

// EmptyURL creates a fresh database without any schema (for migration
// tests) and returns its URL. The database is dropped when the test ends.
func EmptyURL(t testing.TB) string {
	t.Helper()
	return create(t, "")
}

func create(t testing.TB, clause string) string {
	t.Helper()
	admin := AdminURL(t)
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "t_" + strings.ToLower(sanitize(t.Name()))
	if len(name) > 40 {
		name = name[:40]
	}
	name += "_" + hex.EncodeToString(b[:])
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatalf("test database: %v", err)
	}
	defer conn.Close(ctx)
	var lastErr error
	for range 20 { // CREATE DATABASE fails while another session touches the template
		if _, lastErr = conn.Exec(ctx, "CREATE DATABASE "+name+" "+clause); lastErr == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if lastErr != nil {
		t.Fatalf("cannot create test database: %v", lastErr)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if c, err := pgx.Connect(ctx, admin); err == nil {
			_, _ = c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
			c.Close(ctx)
		}
	})
	return withDatabase(admin, name)
}

// Pool returns a connection pool to a fresh migrated database, closed when
// the test ends.
func Pool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	u := URL(t)
	pool, err := db.Open(context.Background(), u)
	if err != nil {
		t.Fatalf("test database: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// Server returns the embedded server backing the tests, or nil when an
// external one (ZEITWORK_TEST_PG_URL) is used. Tests that stop and restart
// the database use it.
func Server(t testing.TB) *embeddedpg.Server {
	AdminURL(t)
	return server
}

func sanitize(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	return b.String()
}
