package topology

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/embeddedpg"
)

// Server-side TCP settings of the topology's PostgreSQL: a session whose
// peer vanished (its region cut off) is ended within seconds, and with it
// the session's advisory locks, so another operator can take the leader
// lock. The same settings belong on a managed PostgreSQL
// (docs/operations.md).
var pgKeepalive = []string{
	"-c", "tcp_keepalives_idle=3", "-c", "tcp_keepalives_interval=1",
	"-c", "tcp_keepalives_count=3", "-c", "tcp_user_timeout=10000",
}

func (t *Topology) pgData() string { return filepath.Join(t.cfg.StateDir, "postgres", "data") }

// initDB creates the cluster and the zeitwork database with the embedded
// PostgreSQL on loopback, then lets the topology's networks in.
func (t *Topology) initDB(ctx context.Context) error {
	db, err := embeddedpg.Start(ctx, embeddedpg.Config{DataDir: t.pgData(), Fast: true})
	if err != nil {
		return err
	}
	err = db.EnsureDatabase(ctx, "zeitwork")
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(t.pgData(), "pg_hba.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	// TLS only, from every host of the layout: the operators connect with
	// sslmode=verify-full, as they would to a managed PostgreSQL.
	_, err = f.WriteString("hostssl all all 10.250.0.0/16 trust\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return t.issueDBCert()
}

// issueDBCert gives PostgreSQL a server certificate (server.crt and
// server.key in its data directory) for db.internal.<zone> and both
// database hosts' addresses, signed by the topology's CA.
func (t *Topology) issueDBCert() error {
	crt, key := filepath.Join(t.pgData(), "server.crt"), filepath.Join(t.pgData(), "server.key")
	ips := []net.IP{net.ParseIP(t.Layout.DB.IP), net.ParseIP(t.Layout.DB2.IP)}
	if err := t.CA.Issue(crt, key, []string{t.DBName()}, ips); err != nil {
		return fmt.Errorf("cannot issue the database's certificate: %w", err)
	}
	// The server reads its key only when it owns it, mode 0600.
	u, err := user.Lookup("postgres")
	if err != nil {
		return err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return errors.Join(os.Chown(crt, uid, gid), os.Chown(key, uid, gid))
}

// dbURL is a database URL for host (the database's name or an address):
// TLS with the server's certificate checked against the topology's CA and
// host, as docs/operations.md prescribes for a managed PostgreSQL.
func (t *Topology) dbURL(host string) string {
	return fmt.Sprintf("postgres://zeitwork@%s:5432/zeitwork?sslmode=verify-full&sslrootcert=%s", host, url.QueryEscape(t.CA.CertFile))
}

// operatorDBURL is the operators' DATABASE_URL. Every query pays the round
// trip to the database's region, so an operator needs more connections
// than pgx's default (4 on this machine) to keep up with the heartbeats and
// route polls of a whole region's workers (and another region's, when that
// region's operators are down).
func (t *Topology) operatorDBURL(host string) string {
	return t.dbURL(host) + "&pool_max_conns=16"
}

// startDB runs PostgreSQL inside host h's namespace on h.IP:5432 and
// waits until it accepts connections from the management network.
func (t *Topology) startDB(ctx context.Context, h *Host) error {
	bin, err := embeddedpg.BinDir()
	if err != nil {
		return err
	}
	args := append([]string{"--reuid=postgres", "--regid=postgres", "--clear-groups", "--",
		filepath.Join(bin, "postgres"), "-D", t.pgData(), "-p", "5432", "-h", h.IP, "-k", t.pgData(),
		"-c", "max_connections=300", "-c", "shared_buffers=64MB",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		"-c", "ssl=on"}, pgKeepalive...)
	p := t.proc(h.Name, "postgres-"+strconv.Itoa(h.Index), "setpriv", nil, "", args...)
	if err := p.Start(ctx, 0); err != nil {
		return err
	}
	t.DB, t.DBHost = p, h
	t.MgmtDatabaseURL = t.dbURL(h.IP)
	deadline := time.Now().Add(time.Minute)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		conn, err := pgx.Connect(cctx, t.MgmtDatabaseURL)
		cancel()
		if err == nil {
			return conn.Close(ctx)
		}
		select {
		case <-p.Done():
			return fmt.Errorf("postgres on %s exited during start-up (log %s)", h.Name, p.LogFile)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("postgres on %s not accepting connections: %w", h.Name, err)
		}
	}
}

// StopDB stops PostgreSQL (fast shutdown: sessions are ended).
func (t *Topology) StopDB() error {
	if t.DB == nil || !t.DB.Running() {
		return nil
	}
	_ = t.DB.Signal(syscall.SIGINT)
	select {
	case <-t.DB.Done():
		return nil
	case <-time.After(30 * time.Second):
		t.DB.Kill()
		return fmt.Errorf("postgres did not stop within 30s of SIGINT")
	}
}

// MoveDB stops PostgreSQL and starts it again, on the same data, on the
// other database host (another address), then points db.internal.<zone>
// at it: what a managed PostgreSQL's failover looks like to the platform.
func (t *Topology) MoveDB(ctx context.Context) error {
	if err := t.StopDB(); err != nil {
		return err
	}
	next := t.Layout.DB2
	if t.DBHost == t.Layout.DB2 {
		next = t.Layout.DB
	} else if _, err := os.Stat(filepath.Join("/run/netns", next.Name)); err != nil {
		if err := t.Layout.addDB2(); err != nil {
			return err
		}
	}
	if err := t.startDB(ctx, next); err != nil {
		return err
	}
	if len(t.DNS) > 0 {
		return t.reloadDNS()
	}
	return nil
}
