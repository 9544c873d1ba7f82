package operator

import (
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/zeitwork/zeitwork/internal/pgtest"
)

// stallProxy forwards TCP connections to a database and can hold every
// byte in both directions (a congested link, a host too loaded to answer)
// without ending any connection.
type stallProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	open   chan struct{} // closed while traffic flows
	wg     sync.WaitGroup
}

// newStallProxy proxies the database of dbURL and returns the proxy and
// dbURL pointed at it.
func newStallProxy(t *testing.T, dbURL string) (*stallProxy, string) {
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{ln: ln, target: u.Host, open: make(chan struct{})}
	close(p.open)
	var conns sync.Map
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			conns.Store(c, up)
			p.wg.Go(func() { p.pipe(up, c) })
			p.wg.Go(func() { p.pipe(c, up) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		p.resume()
		conns.Range(func(k, v any) bool {
			k.(net.Conn).Close()
			v.(net.Conn).Close()
			return true
		})
		p.wg.Wait()
	})
	u.Host = ln.Addr().String()
	return p, u.String()
}

// pipe copies src to dst, holding each chunk while the proxy stalls.
func (p *stallProxy) pipe(dst, src net.Conn) {
	defer dst.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			open := p.open
			p.mu.Unlock()
			<-open
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if err != io.EOF {
				return
			}
			return
		}
	}
}

func (p *stallProxy) stall() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.open:
		p.open = make(chan struct{})
	default:
	}
}

func (p *stallProxy) resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.open:
	default:
		close(p.open)
	}
}

// TestLeaderRidesOutASlowDatabase: the database stops answering for longer
// than a lock check may take, then answers again. The leader pauses its
// work meanwhile and resumes on the same session: the leadership does not
// move, and no operator leads twice.
func TestLeaderRidesOutASlowDatabase(t *testing.T) {
	t.Parallel()
	direct := pgtest.URL(t)
	px, proxied := newStallProxy(t, direct)
	op, _ := startOperator(t, testConfig(proxied))
	admin := pgtestPool(t, direct)
	holder := func() int32 {
		var pid int32
		_ = admin.QueryRow(t.Context(), `SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
			AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
			AND ((classid::bigint << 32) | objid::bigint) = $1`, int64(leaderLockKey)).Scan(&pid)
		return pid
	}
	var pid int32
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if pid = holder(); pid != 0 && op.Leading() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the operator does not lead 30 s after it started")
		}
	}
	stall := leaderCheckEvery + leaderCheckTimeout + 2*time.Second
	px.stall()
	var paused bool
	for end := time.Now().Add(stall); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if !op.Leading() {
			px.resume()
			t.Fatal("the leader stepped down while the database was slow")
		}
		paused = paused || op.leaderPaused()
	}
	px.resume()
	if !paused {
		t.Error("the leader's work did not pause while its lock check was overdue")
	}
	var m dto.Metric
	if err := op.m.pauses.Write(&m); err != nil || m.GetCounter().GetValue() != 1 {
		t.Errorf("zeitwork_operator_leader_pauses_total = %v, want 1 (%v)", m.GetCounter().GetValue(), err)
	}
	for deadline := time.Now().Add(10 * time.Second); op.leaderPaused(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the leader's work still paused 10 s after the database answered again")
		}
	}
	if !op.Leading() {
		t.Fatal("the operator does not lead after the database answered again")
	}
	if got := holder(); got != pid {
		t.Fatalf("the lock moved from session %d to %d", pid, got)
	}
	// Passes go on at once: the pass the pause cut short is no failure
	// to back off from.
	okPasses := func() uint64 {
		var m dto.Metric
		if err := op.m.passes.WithLabelValues("ok").(prometheus.Histogram).Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetHistogram().GetSampleCount()
	}
	before := okPasses()
	for deadline := time.Now().Add(3 * time.Second); okPasses() < before+3; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d passes in the 3 s after the leader resumed", okPasses()-before)
		}
	}
}
