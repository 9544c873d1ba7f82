// Package placement decides which nodes of a region receive a deployment's
// new instances: spread over distinct nodes first, then onto the nodes
// with the most free capacity, never beyond a node's free vCPUs or memory;
// which surplus instances stop (Surplus); and how a deployment placed
// while few nodes were ready moves onto the nodes that joined since
// (Respread), one instance at a time and never below its healthy minimum.
package placement

import (
	"cmp"
	"slices"
)

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

// Instance is one of a deployment's running instances in a region.
type Instance struct {
	ID      string
	Node    string
	Healthy bool
	// Young is true while an unhealthy instance may still pass its
	// health check (it was placed within the deploy timeout).
	Young bool
}

// Surplus chooses which of a region's instances to stop when more than
// want run. It acts only once want of them are healthy, and never stops
// one that would leave fewer than want healthy. It takes from the most
// crowded node first, unhealthy before healthy, and keeps a young
// unhealthy instance that is alone on its node while another node holds
// several: that instance is a move in progress (see Respread) and
// replaces one of the crowded node's once it is healthy.
func Surplus(insts []Instance, want int) []string {
	healthy := 0
	per := map[string]int{}
	for _, in := range insts {
		per[in.Node]++
		if in.Healthy {
			healthy++
		}
	}
	if healthy < want {
		return nil
	}
	crowded := func() bool {
		for _, c := range per {
			if c > 1 {
				return true
			}
		}
		return false
	}
	left := slices.Clone(insts)
	var stop []string
	for len(left) > want {
		best := -1
		for i, in := range left {
			if in.Healthy && healthy-1 < want {
				continue
			}
			if !in.Healthy && in.Young && per[in.Node] == 1 && crowded() {
				continue
			}
			if best < 0 || victimBefore(in, left[best], per) {
				best = i
			}
		}
		if best < 0 {
			break
		}
		v := left[best]
		stop = append(stop, v.ID)
		per[v.Node]--
		if v.Healthy {
			healthy--
		}
		left = slices.Delete(left, best, best+1)
	}
	return stop
}

// victimBefore orders Surplus's candidates: the most crowded node first,
// then unhealthy before healthy, then id.
func victimBefore(a, b Instance, per map[string]int) bool {
	if c := cmp.Compare(per[a.Node], per[b.Node]); c != 0 {
		return c > 0
	}
	if a.Healthy != b.Healthy {
		return !a.Healthy
	}
	return a.ID < b.ID
}

// Respread picks a node for one extra instance when the deployment's
// instances in the region crowd a node (n.Existing) while another node of
// the region holds none and has room: the instances were placed while
// few nodes were ready (a region returning from an outage, nodes joining
// one by one). Surplus stops one of the crowded node's instances once
// the extra one is healthy. It takes the pick's capacity off its node.
func Respread(nodes []*Node, n Need) (string, bool) {
	crowded := false
	for _, c := range n.Existing {
		crowded = crowded || c > 1
	}
	if !crowded {
		return "", false
	}
	var best *Node
	for _, nd := range nodes {
		if nd.Region != n.Region || n.Existing[nd.ID] > 0 || nd.FreeVCPUs < n.VCPUs || nd.FreeMemoryMiB < n.MemoryMiB {
			continue
		}
		if best == nil || better(nd, best, n.Existing) {
			best = nd
		}
	}
	if best == nil {
		return "", false
	}
	best.FreeVCPUs -= n.VCPUs
	best.FreeMemoryMiB -= n.MemoryMiB
	return best.ID, true
}
