package observability

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/embeddedpg"
)

// TestBackupAndPointInTimeRestore runs the database runbooks of
// docs/operations.md against a real PostgreSQL with the cluster's schema:
// a logical backup (pg_dump -Fc) restored into an empty database, and a
// physical base backup (pg_basebackup) plus the WAL archive recovered to
// the moment before an accidental DELETE.
func TestBackupAndPointInTimeRestore(t *testing.T) {
	if testing.Short() {
		t.Skip("runs PostgreSQL three times")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	dataDir := filepath.Join(dir, "primary", "data")
	archive := filepath.Join(dir, "wal-archive")
	for _, d := range []string{archive, filepath.Join(dir, "backups")} {
		if err := PostgresDir(d); err != nil {
			t.Fatal(err)
		}
	}

	// The server as the runbook sets it up: WAL archiving on.
	pg, err := embeddedpg.Start(ctx, embeddedpg.Config{DataDir: dataDir, Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	_ = pg.Close()
	appendConf(t, filepath.Join(dataDir, "postgresql.conf"), fmt.Sprintf(
		"archive_mode = on\narchive_command = 'test ! -f %[1]s/%%f && cp %%p %[1]s/%%f'\narchive_timeout = 60\n", archive))
	if pg, err = embeddedpg.Start(ctx, embeddedpg.Config{DataDir: dataDir, Fast: true}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Close() })
	if err := pg.EnsureDatabase(ctx, "zeitwork"); err != nil {
		t.Fatal(err)
	}
	pool := open(t, pg.URL("zeitwork"))
	if _, err := db.Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	exec := func(p *pgxpool.Pool, q string, args ...any) {
		t.Helper()
		if _, err := p.Exec(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	orgs := func(p *pgxpool.Pool) int {
		t.Helper()
		var n int
		if err := p.QueryRow(ctx, "SELECT count(*) FROM organisations").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for i := range 3 {
		exec(pool, "INSERT INTO organisations (id, name) VALUES (gen_random_uuid(), $1)", "before-"+strconv.Itoa(i))
	}

	// Logical backup and restore into an empty database.
	dump := filepath.Join(dir, "backups", "zeitwork.dump")
	port := strconv.Itoa(pg.Port())
	if _, err := PGTool(ctx, "pg_dump", "-h", "127.0.0.1", "-p", port, "-U", "zeitwork", "-Fc", "-f", dump, "zeitwork"); err != nil {
		t.Fatal(err)
	}
	if err := pg.EnsureDatabase(ctx, "zeitwork_restored"); err != nil {
		t.Fatal(err)
	}
	if _, err := PGTool(ctx, "pg_restore", "-h", "127.0.0.1", "-p", port, "-U", "zeitwork", "-d", "zeitwork_restored", "--no-owner", "--exit-on-error", dump); err != nil {
		t.Fatal(err)
	}
	restored := open(t, pg.URL("zeitwork_restored"))
	if n := orgs(restored); n != 3 {
		t.Errorf("pg_restore: %d organisations, want 3", n)
	}
	if applied, err := db.Migrate(ctx, restored); err != nil || len(applied) != 0 {
		t.Errorf("the restored schema is not current: applied %v, %v", applied, err)
	}
	restored.Close()

	// Base backup, more work, the restore point, then the mistake.
	base := filepath.Join(dir, "backups", "base")
	if _, err := PGTool(ctx, "pg_basebackup", "-h", "127.0.0.1", "-p", port, "-U", "zeitwork", "-D", base,
		"-X", "stream", "--checkpoint=fast", "--no-sync"); err != nil {
		t.Fatal(err)
	}
	exec(pool, "INSERT INTO organisations (id, name) VALUES (gen_random_uuid(), 'after-backup')")
	time.Sleep(200 * time.Millisecond)
	var target string
	if err := pool.QueryRow(ctx, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'").Scan(&target); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	exec(pool, "DELETE FROM organisations") // the accident
	var wal string
	if err := pool.QueryRow(ctx, "SELECT pg_walfile_name(pg_switch_wal())").Scan(&wal); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for { // the segment holding the DELETE reaches the archive
		if _, err := os.Stat(filepath.Join(archive, wal)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("WAL segment %s never archived", wal)
		}
		time.Sleep(100 * time.Millisecond)
	}
	pool.Close()
	_ = pg.Close()

	// Point-in-time recovery of the base backup to the restore point.
	appendConf(t, filepath.Join(base, "postgresql.auto.conf"), fmt.Sprintf(
		"restore_command = 'cp %s/%%f %%p'\nrecovery_target_time = '%s'\nrecovery_target_action = 'promote'\n", archive, target))
	if err := os.WriteFile(filepath.Join(base, "recovery.signal"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	recovered, err := embeddedpg.Start(ctx, embeddedpg.Config{DataDir: base, Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = recovered.Close() })
	rpool := open(t, recovered.URL("zeitwork"))
	deadline = time.Now().Add(time.Minute)
	for {
		var inRecovery bool
		if err := rpool.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&inRecovery); err == nil && !inRecovery {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the recovered server was never promoted")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := orgs(rpool); n != 4 {
		t.Errorf("recovered to %s: %d organisations, want 4 (3 before the backup, 1 after, the DELETE undone)", target, n)
	}
	exec(rpool, "INSERT INTO organisations (id, name) VALUES (gen_random_uuid(), 'writable')")
}

func open(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	p, err := db.Open(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func appendConf(t *testing.T, path, text string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("\n" + text); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}
