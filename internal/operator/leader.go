package operator

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

const leaderLockKey = 0x7a77_6c65_6164 // "zwlead"

// The leader checks its lock connection every leaderCheckEvery. A check
// that has not answered within leaderCheckTimeout pauses the leader's work:
// the pass in progress is cancelled and none starts until the check
// answers, since whether the session (and with it the lock) still lives is
// unknown. An answer resumes the work on the same session; a failed check,
// or none within leaderLostAfter, ends the leadership. So a leader cut off
// from PostgreSQL stops its work within seconds, before the server (its TCP
// keepalives, docs/operations.md) ends the lost session and frees the lock
// for another operator, while a database that is only slow for a moment
// (a loaded host, a congested link) does not move the leadership (ADR 0802).
const (
	leaderCheckEvery   = time.Second
	leaderCheckTimeout = 3 * time.Second
	leaderLostAfter    = 15 * time.Second
)

// lead competes for the leader lock on a dedicated connection and runs the
// reconciler while it holds it.
func (o *Operator) lead(ctx context.Context) {
	for ctx.Err() == nil {
		conn, got, err := o.tryLock(ctx)
		if err != nil {
			sleepCtx(ctx, time.Second)
			continue
		}
		if !got {
			conn.Release()
			sleepCtx(ctx, o.cfg.ReconcileEvery)
			continue
		}
		o.log.Info("became leader")
		o.m.leader.Set(1)
		l := &lease{}
		o.lease.Store(l)
		o.leading.Store(true)
		lctx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() {
			defer cancel()
			o.holdLock(lctx, conn, l)
		})
		o.reconcileLoop(lctx, l)
		cancel()
		wg.Wait()
		o.leading.Store(false)
		o.lease.Store(nil)
		o.m.leader.Set(0)
		uctx, ucancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err = conn.Exec(uctx, "SELECT pg_advisory_unlock($1)", leaderLockKey)
		ucancel()
		if err != nil {
			// The lock may still be held by this session: never hand it
			// back to the pool.
			discard(conn)
		} else {
			conn.Release()
		}
	}
}

// leaderPaused reports whether this operator leads and its work is paused
// on an overdue check of its lock connection.
func (o *Operator) leaderPaused() bool {
	l := o.lease.Load()
	return l != nil && l.isPaused()
}

// tryLock takes a pooled connection and tries the leader lock on it, within
// leaderCheckTimeout: a pooled connection to a database that went away (a
// failover, a cut-off region) fails the attempt instead of blocking it
// until TCP gives up. A connection that failed is closed, never pooled
// again: whether it took the lock is unknown.
func (o *Operator) tryLock(ctx context.Context) (*pgxpool.Conn, bool, error) {
	actx, cancel := context.WithTimeout(ctx, leaderCheckTimeout)
	defer cancel()
	conn, err := o.pool.Acquire(actx)
	if err != nil {
		return nil, false, err
	}
	var got bool
	if err := conn.QueryRow(actx, "SELECT pg_try_advisory_lock($1)", leaderLockKey).Scan(&got); err != nil {
		discard(conn)
		return nil, false, err
	}
	return conn, got, nil
}

// discard closes a connection that must not return to the pool.
func discard(conn *pgxpool.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = conn.Hijack().Close(ctx)
}

// holdLock checks the leader lock connection until a check fails or ctx
// ends.
func (o *Operator) holdLock(ctx context.Context, conn *pgxpool.Conn, l *lease) {
	t := time.NewTicker(leaderCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := o.checkLock(ctx, conn, l); err != nil {
			if ctx.Err() == nil {
				o.log.Warn("lost the leader lock connection; stepping down", "err", err)
			}
			return
		}
	}
}

// checkLock pings the lock connection, pausing l while the answer is
// overdue (leaderCheckTimeout) and resuming it when the answer comes.
func (o *Operator) checkLock(ctx context.Context, conn *pgxpool.Conn, l *lease) error {
	start := time.Now()
	pctx, cancel := context.WithTimeout(ctx, leaderLostAfter)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- conn.Ping(pctx) }()
	overdue := time.NewTimer(leaderCheckTimeout)
	defer overdue.Stop()
	select {
	case err := <-done:
		return err
	case <-overdue.C:
	}
	o.log.Warn("the leader lock connection is slow to answer; pausing the leader's work", "after", leaderCheckTimeout.String())
	l.setPaused(true)
	o.m.pauses.Inc()
	err := <-done
	if err == nil {
		l.setPaused(false)
		o.log.Info("the leader lock connection answered; resuming the leader's work", "after", time.Since(start).Round(time.Millisecond).String())
	}
	return err
}

// lease is one leadership's permission to run reconcile passes.
type lease struct {
	mu     sync.Mutex
	paused bool
	pauses int                // so far: a pass tells whether one cut it short
	cancel context.CancelFunc // the pass in progress
}

// pass returns the context of a new pass and the number of pauses so far,
// or false while paused.
func (l *lease) pass(ctx context.Context) (context.Context, context.CancelFunc, int, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.paused {
		return nil, nil, 0, false
	}
	pctx, cancel := context.WithTimeout(ctx, time.Minute)
	l.cancel = cancel
	return pctx, cancel, l.pauses, true
}

// setPaused pauses (cancelling the pass in progress) or resumes.
func (l *lease) setPaused(p bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.paused = p
	if p {
		l.pauses++
		if l.cancel != nil {
			l.cancel()
		}
	}
}

func (l *lease) isPaused() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.paused
}

// pausedSince reports whether a pause began after the pass that saw n.
func (l *lease) pausedSince(n int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.pauses != n
}

// reconcileLoop runs passes until ctx ends (shutdown, or the leader lock
// connection failed), none while l is paused.
func (o *Operator) reconcileLoop(ctx context.Context, l *lease) {
	t := time.NewTicker(o.cfg.ReconcileEvery)
	defer t.Stop()
	backoff := time.Duration(0)
	for {
		if pctx, cancel, pauses, ok := l.pass(ctx); ok {
			start := time.Now()
			// Builds first: a finished build hands its deployment to this
			// very reconcile pass.
			err := errors.Join(o.builds.Pass(pctx), o.rec.Pass(pctx), o.recheckDomains(pctx))
			// A pass a pause cut short did not fail, even if the leader
			// resumed before it returned: no backoff.
			paused := l.pausedSince(pauses)
			cancel()
			result := "ok"
			switch {
			case err != nil && paused:
				result = "paused"
			case err != nil:
				result = "error"
			}
			o.m.passes.WithLabelValues(result).Observe(time.Since(start).Seconds())
			if err != nil && ctx.Err() == nil && !paused {
				backoff = min(max(2*backoff, 500*time.Millisecond), 30*time.Second)
				o.log.Warn("reconcile pass failed", "err", err, "backoff", backoff.String())
				sleepCtx(ctx, jitter(backoff))
			} else {
				backoff = 0
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-o.kick:
		}
	}
}

func jitter(d time.Duration) time.Duration {
	return d/2 + time.Duration(time.Now().UnixNano()%int64(d/2+1))
}
