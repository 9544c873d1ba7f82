package topology

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/miekg/dns"

	"github.com/zeitwork/zeitwork/internal/apiclient"
	"github.com/zeitwork/zeitwork/internal/devcluster"
)

// PushSample pushes the bundled sample app (examples/hello) tagged tag
// and returns its reference by digest.
func (t *Topology) PushSample(ctx context.Context, tag string) (string, error) {
	return t.Registry.PushSample(ctx, "demo/hello", tag, devcluster.SampleImage{
		Binary: filepath.Join(t.cfg.BinDir, "examples", "hello"), Env: map[string]string{"APP_VERSION": tag}, User: "1000:1000"})
}

// CreateProject creates a project of the sample app with perRegion
// instances in every region (128 MiB microVMs).
func CreateProject(ctx context.Context, api *apiclient.Client, name string, perRegion int) error {
	port, mem, vcpus, health := 8080, 128, 1, "/healthz"
	_, err := api.CreateProject(ctx, apiclient.ProjectSpec{Name: &name, Port: &port, HealthPath: &health,
		MinInstancesPerRegion: &perRegion, MemoryMiB: &mem, VCPUs: &vcpus})
	var ae *apiclient.Error
	if err != nil && !(errors.As(err, &ae) && ae.Status == 409) {
		return err
	}
	return nil
}

// Deploy deploys image to project and waits until it is active (or
// failed, or within).
func Deploy(ctx context.Context, api *apiclient.Client, project, image string, within time.Duration) (*apiclient.DeploymentDetail, error) {
	d, err := api.Deploy(ctx, project, apiclient.DeployRequest{Image: image}, "")
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(within)
	for d.Status != "active" {
		if d.Status == "failed" {
			return d, fmt.Errorf("deployment %s failed: %s", d.ID, d.FailureReason)
		}
		if time.Now().After(deadline) {
			return d, fmt.Errorf("deployment %s still %s after %s", d.ID, d.Status, within)
		}
		select {
		case <-ctx.Done():
			return d, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
		next, err := api.Deployment(ctx, d.ID)
		if err == nil { // an operator may be failing over: keep polling
			d = next
		}
	}
	return d, nil
}

// Client is a user inside one region's client namespace: it resolves
// names through a GeoDNS server and connects to the load balancers from
// there.
type Client struct {
	ns   string
	dns  string // host:port of the GeoDNS server it asks
	dial DialFunc
	HTTP *http.Client
}

// Client returns region i's client, asking the region's GeoDNS server.
func (t *Topology) Client(i int) (*Client, error) {
	pem, err := os.ReadFile(t.CA.CertFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	r := t.Layout.Regions[i]
	c := &Client{ns: r.Of(RoleClient)[0].Name, dns: net.JoinHostPort(r.Of(RoleDNS)[0].IP, "53")}
	c.dial = DialIn(c.ns)
	c.HTTP = &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, port, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			ips, _, err := c.Resolve(ctx, host)
			if err != nil {
				return nil, err
			}
			if len(ips) == 0 {
				return nil, fmt.Errorf("%s: no address", host)
			}
			// HTTPS goes to the load balancers' :8082, HTTP to :8085.
			lbPort := "8082"
			if port == "80" {
				lbPort = "8085"
			}
			return c.dial(ctx, "tcp", net.JoinHostPort(ips[rand.IntN(len(ips))], lbPort))
		},
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		DisableKeepAlives: true, // every request resolves and connects anew
	}}
	return c, nil
}

// Resolve asks the client's GeoDNS server for name's A records, from the
// client's namespace; it returns the addresses and their TTL.
func (c *Client) Resolve(ctx context.Context, name string) ([]string, time.Duration, error) {
	return c.ResolveFor(ctx, name, "")
}

// ResolveFor asks as a resolver would on behalf of a client in subnet
// (an EDNS Client Subnet option; "" sends none).
func (c *Client) ResolveFor(ctx context.Context, name, subnet string) ([]string, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := c.dial(ctx, "udp", c.dns)
	if err != nil {
		return nil, 0, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeA)
	if subnet != "" {
		p, err := netip.ParsePrefix(subnet)
		if err != nil || !p.Addr().Is4() {
			return nil, 0, fmt.Errorf("client subnet %q is not an IPv4 prefix", subnet)
		}
		m.SetEdns0(1232, false)
		opt := m.IsEdns0()
		opt.Option = append(opt.Option, &dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1,
			SourceNetmask: uint8(p.Bits()), Address: p.Addr().AsSlice()})
	}
	dc := &dns.Conn{Conn: conn}
	if err := dc.WriteMsg(m); err != nil {
		return nil, 0, fmt.Errorf("query %s: %w", name, err)
	}
	resp, err := dc.ReadMsg()
	if err != nil {
		return nil, 0, fmt.Errorf("query %s: %w", name, err)
	}
	if resp.Rcode != dns.RcodeSuccess {
		return nil, 0, fmt.Errorf("query %s: %s", name, dns.RcodeToString[resp.Rcode])
	}
	var ips []string
	ttl := time.Duration(-1)
	for _, rr := range resp.Answer {
		if a, ok := rr.(*dns.A); ok {
			ips = append(ips, a.A.String())
			if d := time.Duration(a.Hdr.Ttl) * time.Second; ttl < 0 || d < ttl {
				ttl = d
			}
		}
	}
	return ips, ttl, nil
}
