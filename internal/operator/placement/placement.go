// Package placement decides which nodes of a region receive a deployment's
// new instances: spread over distinct nodes first, then onto the nodes
// with the most free capacity, never beyond a node's free vCPUs or memory.
package placement

import "cmp"

// Node is a ready node's free capacity.
type Node struct {
	ID            string
	Region        string
	FreeVCPUs     int
	FreeMemoryMiB int
}

// Need asks for Count more instances of one size in one region; Existing
// counts the deployment's instances already on each node.
type Need struct {
	Region    string
	Count     int
	VCPUs     int
	MemoryMiB int
	Existing  map[string]int
}

// Place picks a node for each of the need's instances and takes their
// capacity off the nodes it picked. short is how many instances found no
// node with room.
func Place(nodes []*Node, n Need) (picks []string, short int) {
	per := map[string]int{}
	for id, c := range n.Existing {
		per[id] = c
	}
	for range n.Count {
		var best *Node
		for _, nd := range nodes {
			if nd.Region != n.Region || nd.FreeVCPUs < n.VCPUs || nd.FreeMemoryMiB < n.MemoryMiB {
				continue
			}
			if best == nil || better(nd, best, per) {
				best = nd
			}
		}
		if best == nil {
			short++
			continue
		}
		best.FreeVCPUs -= n.VCPUs
		best.FreeMemoryMiB -= n.MemoryMiB
		per[best.ID]++
		picks = append(picks, best.ID)
	}
	return picks, short
}

// better orders candidates: fewer instances of this deployment (distinct
// nodes), then more free memory, then more free vCPUs, then id.
func better(a, b *Node, per map[string]int) bool {
	if c := cmp.Compare(per[a.ID], per[b.ID]); c != 0 {
		return c < 0
	}
	if c := cmp.Compare(a.FreeMemoryMiB, b.FreeMemoryMiB); c != 0 {
		return c > 0
	}
	if c := cmp.Compare(a.FreeVCPUs, b.FreeVCPUs); c != 0 {
		return c > 0
	}
	return a.ID < b.ID
}

// Spread is how many distinct nodes picks (plus existing) cover.
func Spread(picks []string, existing map[string]int) int {
	seen := map[string]bool{}
	for id, c := range existing {
		if c > 0 {
			seen[id] = true
		}
	}
	for _, id := range picks {
		seen[id] = true
	}
	return len(seen)
}
