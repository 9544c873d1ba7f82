package edge

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/summerwind/h2spec/config"
	"github.com/summerwind/h2spec/generic"
	"github.com/summerwind/h2spec/hpack"
	"github.com/summerwind/h2spec/http2"
	"github.com/summerwind/h2spec/spec"

	"github.com/zeitwork/zeitwork/internal/edge/routetable"
)

// h2specAccepted are the h2spec cases the edge fails on purpose, each
// with its reason in docs/adr/0502-edge-http2-path.md.
var h2specAccepted = map[string]bool{}

// TestH2Spec runs every h2spec case (generic, http2, hpack) against a
// running edge: TLS with ALPN h2 on its HTTPS port, requests for a routed
// host proxied to a node agent.
func TestH2Spec(t *testing.T) {
	e := startEdge(t, 0, 0)
	tbl := *e.op.table.Load()
	tbl.Version = "2"
	tbl.Routes = append(append([]routetable.Route(nil), tbl.Routes...), routetable.Route{Host: "localhost", Kind: "versioned", DeploymentID: "d1",
		Instances: []routetable.Instance{{ID: "i1", NodeAddress: e.nodeA.URL, Healthy: true}}})
	e.op.table.Store(&tbl)
	deadline := time.Now().Add(10 * time.Second)
	for e.srv.Routes.Table().Lookup("localhost") == nil {
		if time.Now().After(deadline) {
			t.Fatal("route table never synced")
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, port, _ := net.SplitHostPort(e.https)
	p, _ := strconv.Atoi(port)
	// h2spec dials Host (localhost resolves to the edge's 127.0.0.1 among
	// others) and sends it as :authority.
	c := &config.Config{Host: "localhost", Port: p, Path: "/", Timeout: 5 * time.Second, MaxHeaderLen: 4000, TLS: true, Insecure: true}
	groups := []*spec.TestGroup{generic.Spec(), http2.Spec(), hpack.Spec()}
	start := time.Now()
	for _, g := range groups {
		g.Test(c)
	}
	var passed, failed, skipped int
	var unexpected []string
	var walk func(g *spec.TestGroup)
	walk = func(g *spec.TestGroup) {
		for i, tc := range g.Tests {
			id := fmt.Sprintf("%s/%d", g.ID(), i+1)
			switch {
			case tc.Strict && !c.Strict:
				continue
			case tc.Result == nil || tc.Result.Failed:
				failed++
				if !h2specAccepted[id] {
					unexpected = append(unexpected, id+" "+tc.Desc)
				}
			case tc.Result.Skipped:
				skipped++
			default:
				passed++
			}
		}
		for _, sg := range g.Groups {
			walk(sg)
		}
	}
	for _, g := range groups {
		walk(g)
	}
	t.Logf("h2spec: %d passed, %d failed (%d accepted in ADR 0502), %d skipped, in %v", passed, failed, failed-len(unexpected), skipped, time.Since(start).Round(time.Millisecond))
	if passed == 0 {
		t.Fatal("h2spec ran no case")
	}
	if len(unexpected) > 0 {
		t.Errorf("h2spec cases failed:\n%s", strings.Join(unexpected, "\n"))
	}
}
