// Package certstore is certmagic storage in PostgreSQL (tables
// acme_storage and acme_locks), so every edge proxy in every region shares
// ACME accounts, certificates and issuance locks.
package certstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// LockTTL is how long a lock lives without renewal; a crashed holder's lock
// expires after it.
const LockTTL = 2 * time.Minute

// Store implements certmagic.Storage.
type Store struct {
	Pool *pgxpool.Pool
}

var _ certmagic.Storage = (*Store)(nil)

// Lock takes the named lock, waiting while another live holder has it.
func (s *Store) Lock(ctx context.Context, name string) error {
	for {
		tag, err := s.Pool.Exec(ctx, `INSERT INTO acme_locks (name, expires_at) VALUES ($1, now() + $2::interval)
			ON CONFLICT (name) DO UPDATE SET expires_at = excluded.expires_at WHERE acme_locks.expires_at < now()`,
			name, fmt.Sprintf("%d seconds", int(LockTTL.Seconds())))
		if err != nil {
			return fmt.Errorf("cannot lock %s: %w", name, err)
		}
		if tag.RowsAffected() == 1 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// Unlock releases the named lock.
func (s *Store) Unlock(ctx context.Context, name string) error {
	_, err := s.Pool.Exec(ctx, `DELETE FROM acme_locks WHERE name = $1`, name)
	return err
}

// Store writes value at key.
func (s *Store) Store(ctx context.Context, key string, value []byte) error {
	_, err := s.Pool.Exec(ctx, `INSERT INTO acme_storage (key, value, modified_at) VALUES ($1, $2, now())
		ON CONFLICT (key) DO UPDATE SET value = excluded.value, modified_at = now()`, key, value)
	return err
}

// Load reads key.
func (s *Store) Load(ctx context.Context, key string) ([]byte, error) {
	var v []byte
	err := s.Pool.QueryRow(ctx, `SELECT value FROM acme_storage WHERE key = $1`, key).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fs.ErrNotExist
	}
	return v, err
}

// Delete removes key and everything under it.
func (s *Store) Delete(ctx context.Context, key string) error {
	_, err := s.Pool.Exec(ctx, `DELETE FROM acme_storage WHERE key = $1 OR key LIKE $2`, key, escapeLike(key)+"/%")
	return err
}

// Exists reports whether key is a file or a directory.
func (s *Store) Exists(ctx context.Context, key string) bool {
	var ok bool
	err := s.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM acme_storage WHERE key = $1 OR key LIKE $2)`, key, escapeLike(key)+"/%").Scan(&ok)
	return err == nil && ok
}

// List lists keys under path.
func (s *Store) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	prefix := strings.TrimSuffix(path, "/") + "/"
	if path == "" {
		prefix = ""
	}
	rows, err := s.Pool.Query(ctx, `SELECT key FROM acme_storage WHERE key LIKE $1 ORDER BY key`, escapeLike(prefix)+"%")
	if err != nil {
		return nil, err
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, fs.ErrNotExist
	}
	if recursive {
		return keys, nil
	}
	seen := map[string]bool{}
	var out []string
	for _, k := range keys {
		rest := strings.TrimPrefix(k, prefix)
		first, _, _ := strings.Cut(rest, "/")
		if !seen[first] {
			seen[first] = true
			out = append(out, prefix+first)
		}
	}
	return out, nil
}

// Stat describes key.
func (s *Store) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	var size int64
	var mod time.Time
	err := s.Pool.QueryRow(ctx, `SELECT length(value), modified_at FROM acme_storage WHERE key = $1`, key).Scan(&size, &mod)
	if err == nil {
		return certmagic.KeyInfo{Key: key, Modified: mod, Size: size, IsTerminal: true}, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return certmagic.KeyInfo{}, err
	}
	if s.Exists(ctx, key) {
		return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
	}
	return certmagic.KeyInfo{}, fs.ErrNotExist
}

func escapeLike(s string) string {
	return strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`).Replace(s)
}
