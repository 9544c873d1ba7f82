package topology

import "fmt"

// CutRegion partitions region i from the rest of the layout: its link to
// the core drops every packet silently (no reset, no ICMP), as a lost
// region looks to the others. Its hosts keep running.
func (t *Topology) CutRegion(i int) error {
	if i < 0 || i >= len(t.wires) {
		return fmt.Errorf("no region %d", i)
	}
	t.wires[i].cut.Store(true)
	return nil
}

// RestoreRegion joins a cut region again.
func (t *Topology) RestoreRegion(i int) error {
	if i < 0 || i >= len(t.wires) {
		return fmt.Errorf("no region %d", i)
	}
	t.wires[i].cut.Store(false)
	return nil
}
