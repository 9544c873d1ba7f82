package topology

import "fmt"

// CutRegion cuts region i's link to the core, as a fibre cut does: both
// ends lose their link, so the core answers packets for the region with
// ICMP "network unreachable" (new connections to it fail at once) while
// established connections — a PostgreSQL session of an operator in the
// region — hear nothing more and wait on their timeouts and keepalives.
// The region's hosts keep running.
func (t *Topology) CutRegion(i int) error {
	if i < 0 || i >= len(t.wires) {
		return fmt.Errorf("no region %d", i)
	}
	r := t.Layout.Regions[i]
	if err := ipn(t.Layout.Core, "link", "set", "r"+r.Key, "down"); err != nil {
		return err
	}
	return ipn(r.Router, "link", "set", "up0", "down")
}

// BlackholeRegion partitions region i silently instead: its link drops
// every packet (no ICMP, no reset), so even new connections to it wait
// for their timeouts.
func (t *Topology) BlackholeRegion(i int) error {
	if i < 0 || i >= len(t.wires) {
		return fmt.Errorf("no region %d", i)
	}
	t.wires[i].cut.Store(true)
	return nil
}

// RestoreRegion joins a cut or blackholed region again.
func (t *Topology) RestoreRegion(i int) error {
	if i < 0 || i >= len(t.wires) {
		return fmt.Errorf("no region %d", i)
	}
	r := t.Layout.Regions[i]
	t.wires[i].cut.Store(false)
	for _, s := range [][]string{
		{"ip", t.Layout.Core, "link", "set", "r" + r.Key, "up"},
		{"ip", r.Router, "link", "set", "up0", "up"},
		{"ip", t.Layout.Core, "route", "replace", r.Subnet, "dev", "r" + r.Key},
		{"ip", r.Router, "route", "replace", "default", "dev", "up0"},
	} {
		if err := t.Layout.step(s); err != nil {
			return err
		}
	}
	return nil
}
