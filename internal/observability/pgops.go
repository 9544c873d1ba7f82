package observability

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/zeitwork/zeitwork/internal/embeddedpg"
)

// PGTool runs one of PostgreSQL's programs (pg_basebackup, pg_dump,
// pg_restore, psql, …) from the server's bin directory, as the postgres
// system user when the caller is root (PostgreSQL refuses to run its
// server as root, and files it writes must belong to the server's user).
// It returns the combined output.
func PGTool(ctx context.Context, name string, args ...string) ([]byte, error) {
	bin, err := embeddedpg.BinDir()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(bin, name), args...)
	cmd.Dir = os.TempDir()
	if os.Geteuid() == 0 {
		uid, gid, err := postgresUser()
		if err != nil {
			return nil, err
		}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, NoSetGroups: true}}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s: %w: %s", name, err, out)
	}
	return out, nil
}

// PostgresDir creates dir (mode 0700) for files PGTool's programs write,
// owned by the postgres user when the caller is root, and makes its
// parents traversable for that user.
func PostgresDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return nil
	}
	uid, gid, err := postgresUser()
	if err != nil {
		return err
	}
	for d := filepath.Dir(dir); d != "/" && d != "."; d = filepath.Dir(d) {
		if fi, err := os.Stat(d); err == nil && fi.Mode().Perm()&0o001 == 0 {
			_ = os.Chmod(d, fi.Mode().Perm()|0o011)
		}
	}
	return os.Chown(dir, int(uid), int(gid))
}

func postgresUser() (uid, gid uint32, err error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return 0, 0, fmt.Errorf("running PostgreSQL programs as root needs the postgres system user: %w", err)
	}
	a, _ := strconv.Atoi(u.Uid)
	b, _ := strconv.Atoi(u.Gid)
	return uint32(a), uint32(b), nil
}
