package edge

import (
	"log/slog"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

func TestPickPrefersOwnRegion(t *testing.T) {
	in := func(id, region string, healthy bool) routetable.Instance {
		return routetable.Instance{ID: id, Region: region, Healthy: healthy, NodeAddress: "http://127.0.0.1:1"}
	}
	cases := []struct {
		name    string
		region  string
		insts   []routetable.Instance
		ejected []string
		tried   []string
		want    map[string]bool // the instances pick may return; nil: none
	}{
		{name: "own region only", region: "eu", insts: []routetable.Instance{in("e1", "eu", true), in("e2", "eu", true), in("u1", "us", true), in("a1", "ap", true)},
			want: map[string]bool{"e1": true, "e2": true}},
		{name: "own region unhealthy", region: "eu", insts: []routetable.Instance{in("e1", "eu", false), in("u1", "us", true), in("a1", "ap", true)},
			want: map[string]bool{"u1": true, "a1": true}},
		{name: "own region ejected", region: "eu", insts: []routetable.Instance{in("e1", "eu", true), in("u1", "us", true)}, ejected: []string{"e1"},
			want: map[string]bool{"u1": true}},
		{name: "own region tried", region: "eu", insts: []routetable.Instance{in("e1", "eu", true), in("e2", "eu", true), in("u1", "us", true)}, tried: []string{"e1"},
			want: map[string]bool{"e2": true}},
		{name: "own region all tried", region: "eu", insts: []routetable.Instance{in("e1", "eu", true), in("u1", "us", true)}, tried: []string{"e1"},
			want: map[string]bool{"u1": true}},
		{name: "all ejected: healthy anyway", region: "eu", insts: []routetable.Instance{in("e1", "eu", true), in("u1", "us", true)}, ejected: []string{"e1", "u1"},
			want: map[string]bool{"e1": true, "u1": true}},
		{name: "no region: any", region: "", insts: []routetable.Instance{in("e1", "eu", true), in("u1", "us", true)},
			want: map[string]bool{"e1": true, "u1": true}},
		{name: "instances without region", region: "eu", insts: []routetable.Instance{in("x1", "", true), in("x2", "", true)},
			want: map[string]bool{"x1": true, "x2": true}},
		{name: "nothing healthy", region: "eu", insts: []routetable.Instance{in("e1", "eu", false), in("u1", "us", false)}},
		{name: "everything tried", region: "eu", insts: []routetable.Instance{in("e1", "eu", true), in("u1", "us", true)}, tried: []string{"e1", "u1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := New(Config{Region: tc.region}, routetable.New(routetable.Options{}), nil, slog.New(slog.DiscardHandler))
			for _, id := range tc.ejected {
				p.stateOf(id).ejectedUntil.Store(time.Now().Add(time.Minute).UnixNano())
			}
			route := &routetable.Route{Host: "a.example", Instances: tc.insts}
			seen := map[string]bool{}
			for range 200 {
				got := p.pick(route, tc.tried)
				if got == nil {
					if tc.want != nil {
						t.Fatalf("pick = nil, want one of %v", tc.want)
					}
					continue
				}
				if !tc.want[got.ID] {
					t.Fatalf("pick = %s, want one of %v", got.ID, tc.want)
				}
				seen[got.ID] = true
			}
			if len(seen) != len(tc.want) {
				t.Errorf("pick chose %v over 200 calls, want each of %v", seen, tc.want)
			}
		})
	}
}

func TestPickAllocates(t *testing.T) {
	p := New(Config{Region: "eu"}, routetable.New(routetable.Options{}), nil, slog.New(slog.DiscardHandler))
	route := &routetable.Route{Instances: []routetable.Instance{
		{ID: "e1", Region: "eu", Healthy: true}, {ID: "e2", Region: "eu", Healthy: true}, {ID: "u1", Region: "us", Healthy: true}}}
	tried := []string{"e1"}
	if n := testing.AllocsPerRun(100, func() { p.pick(route, nil); p.pick(route, tried) }); n != 0 {
		t.Errorf("pick allocates %.1f times", n)
	}
}

// BenchmarkPick: six instances in three regions, two of them the edge's
// (own), or none of them (other: pick falls back to every region).
func BenchmarkPick(b *testing.B) {
	var insts []routetable.Instance
	for i, r := range []string{"eu", "eu", "us", "us", "ap", "ap"} {
		insts = append(insts, routetable.Instance{ID: "i" + string(rune('0'+i)), Region: r, Healthy: true})
	}
	route := &routetable.Route{Instances: insts}
	for _, region := range []string{"eu", "sa"} {
		name := map[string]string{"eu": "own", "sa": "other"}[region]
		b.Run(name, func(b *testing.B) {
			p := New(Config{Region: region}, routetable.New(routetable.Options{}), nil, slog.New(slog.DiscardHandler))
			b.ReportAllocs()
			for b.Loop() {
				p.pick(route, nil)
			}
		})
	}
}
