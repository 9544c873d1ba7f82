package db_test

import (
	"context"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/pgtest"
)

// TestMigrateEmptyConcurrentIdempotent applies the embedded migrations to
// an empty database from several "operators" at once, then again: every
// migration is applied exactly once and the second run is a no-op.
func TestMigrateEmptyConcurrentIdempotent(t *testing.T) {
	ctx := t.Context()
	url := pgtest.EmptyURL(t)

	migs, err := db.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	applied := make([][]string, 3)
	errs := make([]error, 3)
	for i := range 3 {
		wg.Go(func() {
			pool, err := db.Open(ctx, url)
			if err != nil {
				errs[i] = err
				return
			}
			defer pool.Close()
			applied[i], errs[i] = db.Migrate(ctx, pool)
		})
	}
	wg.Wait()
	total := 0
	for i := range 3 {
		if errs[i] != nil {
			t.Fatalf("operator %d: %v", i, errs[i])
		}
		total += len(applied[i])
	}
	if total != len(migs) {
		t.Fatalf("applied %d migrations across concurrent runs, want exactly %d", total, len(migs))
	}
	pool, err := db.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	again, err := db.Migrate(ctx, pool)
	if err != nil || len(again) != 0 {
		t.Fatalf("second migrate applied %v, err %v; want nothing", again, err)
	}
	var n int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM schema_migrations").Scan(&n); err != nil || n != len(migs) {
		t.Fatalf("schema_migrations has %d rows (err %v), want %d", n, err, len(migs))
	}
}

// TestFreshDatabasesAreIsolated checks that two tests' databases do not
// share state.
func TestFreshDatabasesAreIsolated(t *testing.T) {
	t.Parallel()
	a, b := pgtest.Pool(t), pgtest.Pool(t)
	ctx := t.Context()
	if _, err := a.Exec(ctx, "CREATE TABLE probe (x int)"); err != nil {
		t.Fatal(err)
	}
	var exists bool
	if err := b.QueryRow(ctx, "SELECT to_regclass('probe') IS NOT NULL").Scan(&exists); err != nil || exists {
		t.Fatalf("table leaked between test databases (exists=%v, err=%v)", exists, err)
	}
	err := db.Tx(ctx, a, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "INSERT INTO probe VALUES (1)"); err != nil {
			return err
		}
		return context.Canceled
	})
	if err == nil {
		t.Fatal("Tx returned nil for a failing body")
	}
	var n int
	if err := a.QueryRow(ctx, "SELECT count(*) FROM probe").Scan(&n); err != nil || n != 0 {
		t.Fatalf("rolled-back insert is visible: n=%d err=%v", n, err)
	}
}
