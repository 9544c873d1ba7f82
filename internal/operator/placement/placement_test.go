package placement

import (
	"fmt"
	"slices"
	"testing"
)

func nodes(region string, n, vcpus, mem int) []*Node {
	var out []*Node
	for i := range n {
		out = append(out, &Node{ID: fmt.Sprintf("%s-%d", region, i), Region: region, FreeVCPUs: vcpus, FreeMemoryMiB: mem})
	}
	return out
}

func TestPlace(t *testing.T) {
	for _, tc := range []struct {
		name      string
		nodes     []*Node
		need      Need
		picks     int
		short     int
		spread    int
		maxOnNode int
	}{
		{"three on three distinct", nodes("a", 3, 4, 1024), Need{Region: "a", Count: 3, VCPUs: 1, MemoryMiB: 128}, 3, 0, 3, 1},
		{"three on two nodes", nodes("a", 2, 4, 1024), Need{Region: "a", Count: 3, VCPUs: 1, MemoryMiB: 128}, 3, 0, 2, 2},
		{"other region ignored", append(nodes("a", 1, 4, 1024), nodes("b", 3, 4, 1024)...), Need{Region: "a", Count: 3, VCPUs: 1, MemoryMiB: 128}, 3, 0, 1, 3},
		{"memory short", nodes("a", 2, 16, 256), Need{Region: "a", Count: 3, VCPUs: 1, MemoryMiB: 256}, 2, 1, 2, 1},
		{"vcpus short", nodes("a", 3, 1, 4096), Need{Region: "a", Count: 5, VCPUs: 1, MemoryMiB: 128}, 3, 2, 3, 1},
		{"no nodes", nil, Need{Region: "a", Count: 2, VCPUs: 1, MemoryMiB: 128}, 0, 2, 0, 0},
		{"existing counted", nodes("a", 3, 4, 1024), Need{Region: "a", Count: 1, VCPUs: 1, MemoryMiB: 128, Existing: map[string]int{"a-0": 1, "a-1": 1}}, 1, 0, 3, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			picks, short := Place(tc.nodes, tc.need)
			if len(picks) != tc.picks || short != tc.short {
				t.Fatalf("picks %v short %d", picks, short)
			}
			if s := Spread(picks, tc.need.Existing); s != tc.spread {
				t.Fatalf("spread %d over %v", s, picks)
			}
			per := map[string]int{}
			for _, p := range picks {
				per[p]++
			}
			for id, c := range per {
				if c > tc.maxOnNode {
					t.Fatalf("%d instances on %s", c, id)
				}
			}
			for _, n := range tc.nodes {
				if n.FreeVCPUs < 0 || n.FreeMemoryMiB < 0 {
					t.Fatalf("node %s overcommitted: %+v", n.ID, n)
				}
			}
		})
	}
}

func TestPlacePrefersFreeCapacity(t *testing.T) {
	ns := []*Node{{ID: "busy", Region: "a", FreeVCPUs: 1, FreeMemoryMiB: 200}, {ID: "idle", Region: "a", FreeVCPUs: 8, FreeMemoryMiB: 8000}}
	picks, _ := Place(ns, Need{Region: "a", Count: 1, VCPUs: 1, MemoryMiB: 128})
	if len(picks) != 1 || picks[0] != "idle" {
		t.Fatalf("picked %v", picks)
	}
}

func FuzzPlace(f *testing.F) {
	f.Add(uint8(3), uint8(3), uint8(4), uint16(1024), uint8(1), uint16(128))
	f.Fuzz(func(t *testing.T, nNodes, count, vcpus uint8, mem uint16, iv uint8, im uint16) {
		ns := nodes("a", int(nNodes%10), int(vcpus%16), int(mem))
		need := Need{Region: "a", Count: int(count % 20), VCPUs: int(iv%4) + 1, MemoryMiB: int(im) + 1}
		picks, short := Place(ns, need)
		if len(picks)+short != need.Count {
			t.Fatalf("%d picks + %d short != %d", len(picks), short, need.Count)
		}
		for _, n := range ns {
			if n.FreeVCPUs < 0 || n.FreeMemoryMiB < 0 {
				t.Fatalf("overcommitted %+v", n)
			}
		}
		// Identical nodes end up balanced: counts differ by at most one.
		per := map[string]int{}
		for _, p := range picks {
			per[p]++
		}
		lo, hi := len(picks), 0
		for _, n := range ns {
			lo, hi = min(lo, per[n.ID]), max(hi, per[n.ID])
		}
		if len(ns) > 0 && len(picks) > 0 && hi-lo > 1 {
			t.Fatalf("unbalanced %v over %d nodes", per, len(ns))
		}
	})
}

func TestSurplus(t *testing.T) {
	h := func(id, node string) Instance { return Instance{ID: id, Node: node, Healthy: true} }
	starting := func(id, node string) Instance { return Instance{ID: id, Node: node, Young: true} }
	stuck := func(id, node string) Instance { return Instance{ID: id, Node: node} }
	for _, tc := range []struct {
		name  string
		insts []Instance
		want  int
		stop  []string
	}{
		{"at want", []Instance{h("1", "a"), h("2", "b"), h("3", "c")}, 3, nil},
		{"scaled down: unhealthy first", []Instance{h("1", "a"), stuck("2", "b"), h("3", "c"), h("4", "d"), h("5", "e")}, 3, []string{"2", "1"}},
		{"scaled down: crowded node first", []Instance{h("1", "a"), h("2", "b"), h("3", "b"), h("4", "c")}, 3, []string{"2"}},
		{"waits while fewer than want are healthy", []Instance{h("1", "a"), starting("2", "b"), starting("3", "c"), h("4", "d")}, 3, nil},
		{"a move in progress waits for its instance", []Instance{h("1", "a"), h("2", "a"), h("3", "b"), starting("4", "c")}, 3, nil},
		{"a move completes once it is healthy", []Instance{h("1", "a"), h("2", "a"), h("3", "b"), h("4", "c")}, 3, []string{"1"}},
		{"a move that never got healthy is undone", []Instance{h("1", "a"), h("2", "a"), h("3", "b"), stuck("4", "c")}, 3, []string{"4"}},
		{"young surplus without a move is stopped", []Instance{h("1", "a"), h("2", "b"), h("3", "c"), starting("4", "d")}, 3, []string{"4"}},
		{"never below want healthy", []Instance{h("1", "a"), h("2", "a"), h("3", "a"), starting("4", "a")}, 3, []string{"4"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Surplus(tc.insts, tc.want); !slices.Equal(got, tc.stop) {
				t.Fatalf("Surplus = %v, want %v", got, tc.stop)
			}
		})
	}
}

// TestRespreadConverges runs the reconciler's per-region rules as passes:
// three instances placed while only two of six nodes were ready end on
// three distinct nodes, one move at a time, with never fewer than three
// healthy instances.
func TestRespreadConverges(t *testing.T) {
	const want = 3
	ns := nodes("a", 6, 4, 1024)
	insts := []Instance{
		{ID: "i1", Node: "a-0", Healthy: true},
		{ID: "i2", Node: "a-0", Healthy: true},
		{ID: "i3", Node: "a-1", Healthy: true},
	}
	next := 4
	for pass := range 20 {
		healthy := 0
		per := map[string]int{}
		for i := range insts {
			per[insts[i].Node]++
			if insts[i].Healthy {
				healthy++
			}
		}
		if healthy < want {
			t.Fatalf("pass %d: %d healthy instances", pass, healthy)
		}
		switch {
		case len(insts) > want:
			for _, id := range Surplus(insts, want) {
				insts = slices.DeleteFunc(insts, func(in Instance) bool { return in.ID == id })
			}
		case len(insts) == want:
			if pick, ok := Respread(ns, Need{Region: "a", VCPUs: 1, MemoryMiB: 128, Existing: per}); ok {
				insts = append(insts, Instance{ID: fmt.Sprintf("i%d", next), Node: pick, Young: true})
				next++
			}
		}
		// Instances started in the previous pass pass their health check.
		for i := range insts {
			if insts[i].Young {
				insts[i].Healthy, insts[i].Young = true, false
			}
		}
	}
	per := map[string]int{}
	for _, in := range insts {
		per[in.Node]++
	}
	if len(insts) != want || len(per) != want {
		t.Fatalf("after the passes: %v", insts)
	}
}

func TestRespreadNeedsARoomyEmptyNode(t *testing.T) {
	crowded := map[string]int{"a-0": 2, "a-1": 1}
	if _, ok := Respread(nodes("a", 2, 4, 1024), Need{Region: "a", VCPUs: 1, MemoryMiB: 128, Existing: crowded}); ok {
		t.Fatal("moved with no empty node")
	}
	full := nodes("a", 3, 4, 1024)
	full[2].FreeMemoryMiB = 64
	if _, ok := Respread(full, Need{Region: "a", VCPUs: 1, MemoryMiB: 128, Existing: crowded}); ok {
		t.Fatal("moved onto a node without room")
	}
	if _, ok := Respread(nodes("a", 4, 4, 1024), Need{Region: "a", VCPUs: 1, MemoryMiB: 128, Existing: map[string]int{"a-0": 1, "a-1": 1, "a-2": 1}}); ok {
		t.Fatal("moved an already spread deployment")
	}
	if pick, ok := Respread(append(nodes("b", 2, 4, 1024), nodes("a", 3, 4, 1024)...), Need{Region: "a", VCPUs: 1, MemoryMiB: 128, Existing: crowded}); !ok || pick != "a-2" {
		t.Fatalf("Respread = %q, %v; want a-2", pick, ok)
	}
}
