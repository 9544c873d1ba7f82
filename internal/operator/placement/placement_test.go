package placement

import (
	"fmt"
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
