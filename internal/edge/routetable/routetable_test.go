package routetable

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync/atomic"
	"testing"
	"time"
)

// operator is a fake operator's route table endpoint; answer writes one
// poll's response.
type operator struct {
	srv   *httptest.Server
	url   *url.URL
	polls atomic.Int64
}

func newOperator(t *testing.T, answer func(w http.ResponseWriter, r *http.Request)) *operator {
	o := &operator{}
	o.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v1/routes" || r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "no", http.StatusNotFound)
			return
		}
		o.polls.Add(1)
		answer(w, r)
	}))
	t.Cleanup(func() {
		o.srv.CloseClientConnections()
		o.srv.Close()
	})
	o.url, _ = url.Parse(o.srv.URL)
	return o
}

// heartbeats answers as an operator does: headers at once, a space every
// heartbeat while the version is unchanged, the table when it changed or
// the wait passed.
func heartbeats(table func() *Table) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		wait, _ := time.ParseDuration(r.URL.Query().Get("wait"))
		hb, _ := time.ParseDuration(r.URL.Query().Get("heartbeat"))
		w.Header().Set("Zeitwork-Heartbeat", hb.String())
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		deadline := time.Now().Add(wait)
		last := time.Now()
		for table().Version == r.URL.Query().Get("version") && time.Now().Before(deadline) {
			if time.Since(last) >= hb {
				_, _ = w.Write([]byte(" "))
				w.(http.Flusher).Flush()
				last = time.Now()
			}
			select {
			case <-r.Context().Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
		_ = json.NewEncoder(w).Encode(table())
	}
}

func run(t *testing.T, ops ...*operator) *Client {
	var urls []*url.URL
	for _, o := range ops {
		urls = append(urls, o.url)
	}
	c := New(Options{Operators: urls, Token: "tok", Log: slog.New(slog.DiscardHandler), Wait: 5 * time.Second, Silence: 600 * time.Millisecond})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return c
}

func waitVersion(t *testing.T, c *Client, v string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for c.Table().Version != v {
		if time.Since(start) > within {
			t.Fatalf("version %q after %s, want %q", c.Table().Version, within, v)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// TestHeartbeatsKeepALongPoll: an operator that writes heartbeats is
// polled for the whole wait, without failing over, and its table decodes
// after the leading spaces.
func TestHeartbeatsKeepALongPoll(t *testing.T) {
	var cur atomic.Pointer[Table]
	cur.Store(&Table{Version: "v1"})
	a := newOperator(t, heartbeats(func() *Table { return cur.Load() }))
	b := newOperator(t, heartbeats(func() *Table { return cur.Load() }))
	c := run(t, a, b)
	waitVersion(t, c, "v1", 2*time.Second)
	time.Sleep(2 * time.Second) // several Silences of heartbeats only
	cur.Store(&Table{Version: "v2"})
	if took := waitVersion(t, c, "v2", time.Second); took > 500*time.Millisecond {
		t.Errorf("a change took %s to arrive", took)
	}
	if n := b.polls.Load(); n != 0 {
		t.Errorf("the client failed over %d times from an operator that writes heartbeats", n)
	}
	if n := a.polls.Load(); n > 3 {
		t.Errorf("%d polls in about 2 s with a 5 s wait", n)
	}
}

// TestSilentOperatorFailsOver: an operator that stops sending — before
// its answer's head or within its body — is left after Silence, for the
// next one, without a backoff.
func TestSilentOperatorFailsOver(t *testing.T) {
	hang := map[string]func(w http.ResponseWriter, r *http.Request){
		"before the head": func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() },
		"in the body": func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Zeitwork-Heartbeat", "200ms")
			w.WriteHeader(200)
			_, _ = w.Write([]byte(" "))
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		},
	}
	for name, h := range hang {
		t.Run(name, func(t *testing.T) {
			var cur atomic.Pointer[Table]
			cur.Store(&Table{Version: "v1"})
			var silent atomic.Bool
			a := newOperator(t, func(w http.ResponseWriter, r *http.Request) {
				if silent.Load() {
					h(w, r)
					return
				}
				heartbeats(func() *Table { return cur.Load() })(w, r)
			})
			b := newOperator(t, heartbeats(func() *Table { return cur.Load() }))
			c := run(t, a, b)
			waitVersion(t, c, "v1", 2*time.Second)
			time.Sleep(300 * time.Millisecond) // the client learns a writes heartbeats
			silent.Store(true)
			a.srv.CloseClientConnections() // the poll in progress ends; the next one hangs
			time.Sleep(100 * time.Millisecond)
			cur.Store(&Table{Version: "v2"})
			// The poll in progress (to a, now silent) fails after Silence
			// (600 ms); b answers at once.
			if took := waitVersion(t, c, "v2", 3*time.Second); took > 1500*time.Millisecond {
				t.Errorf("the new table took %s to arrive with a silent operator (silence 600ms)", took)
			}
		})
	}
}

// TestOperatorWithoutHeartbeats: an operator that predates heartbeats
// (no Zeitwork-Heartbeat, silent until its answer) is polled with waits
// short enough not to be taken for a lost one.
func TestOperatorWithoutHeartbeats(t *testing.T) {
	var cur atomic.Pointer[Table]
	cur.Store(&Table{Version: "v1"})
	var maxWait atomic.Int64
	old := func(w http.ResponseWriter, r *http.Request) {
		wait, _ := time.ParseDuration(r.URL.Query().Get("wait"))
		if int64(wait) > maxWait.Load() {
			maxWait.Store(int64(wait))
		}
		deadline := time.Now().Add(wait)
		for cur.Load().Version == r.URL.Query().Get("version") && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		_ = json.NewEncoder(w).Encode(cur.Load())
	}
	a := newOperator(t, old)
	b := newOperator(t, old)
	c := run(t, a, b)
	waitVersion(t, c, "v1", 2*time.Second)
	time.Sleep(1500 * time.Millisecond)
	cur.Store(&Table{Version: "v2"})
	waitVersion(t, c, "v2", time.Second)
	if n := b.polls.Load(); n != 0 {
		t.Errorf("the client failed over %d times from an operator without heartbeats", n)
	}
	if w := time.Duration(maxWait.Load()); w > 300*time.Millisecond {
		t.Errorf("an operator without heartbeats was polled with wait=%s (silence 600ms)", w)
	}
}

// TestLostOperatorsAreNotTriedInARow: an edge that had to leave its own
// region's operator (it refused) polls another region's; when that whole
// region goes silent, the edge returns to its own region's operator,
// answering again, after one Silence instead of trying the silent region's
// operators one after the other.
func TestLostOperatorsAreNotTriedInARow(t *testing.T) {
	var cur atomic.Pointer[Table]
	cur.Store(&Table{Version: "v1"})
	table := func() *Table { return cur.Load() }
	var homeDown, regionCut atomic.Bool
	homeDown.Store(true)
	home := newOperator(t, func(w http.ResponseWriter, r *http.Request) {
		if homeDown.Load() {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		heartbeats(table)(w, r)
	})
	var other []*operator
	for range 3 {
		other = append(other, newOperator(t, func(w http.ResponseWriter, r *http.Request) {
			if regionCut.Load() {
				<-r.Context().Done()
				return
			}
			heartbeats(table)(w, r)
		}))
	}
	c := run(t, append([]*operator{home}, other...)...)
	waitVersion(t, c, "v1", 2*time.Second)
	if other[0].polls.Load() == 0 {
		t.Fatal("the client did not move to the next operator")
	}
	homeDown.Store(false)
	time.Sleep(c.retryAfter() + 100*time.Millisecond) // the poll of other[0] goes on (wait 5 s)
	regionCut.Store(true)
	cur.Store(&Table{Version: "v2"})
	// The poll in progress hangs (its operator silent since the cut):
	// one Silence (600 ms), then home answers.
	if took := waitVersion(t, c, "v2", 5*time.Second); took > 1200*time.Millisecond {
		t.Errorf("the new table took %s to arrive (silence 600ms, 3 operators cut off)", took)
	}
	if n := other[1].polls.Load() + other[2].polls.Load(); n != 0 {
		t.Errorf("%d polls went to further operators of the cut region while the edge's own answered", n)
	}
	// Home stays the one polled.
	cur.Store(&Table{Version: "v3"})
	waitVersion(t, c, "v3", time.Second)
	if n := other[1].polls.Load() + other[2].polls.Load(); n != 0 {
		t.Errorf("%d polls went to the cut region", n)
	}
}
