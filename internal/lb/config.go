package lb

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/zeitwork/zeitwork/internal/envconfig"
)

// ServiceConfig is everything zeitwork-load-balancer reads from its
// environment.
type ServiceConfig struct {
	LB        Config
	AdminAddr string
	Backends  []string // static backend hosts (LB_BACKENDS)
	Operators []*url.URL
	Region    string
	Token     string
	Discover  time.Duration
}

// LoadServiceConfig reads the configuration, recording problems in l.
func LoadServiceConfig(l *envconfig.Loader) ServiceConfig {
	c := ServiceConfig{
		AdminAddr: l.Addr("LB_ADMIN_ADDR", ":8084"),
		Backends:  l.List("LB_BACKENDS", nil),
		Operators: l.URLs("OPERATOR_URL", nil),
		Region:    l.String("REGION", "default"),
		Token:     l.String("CLUSTER_TOKEN", ""),
		Discover:  l.Duration("LB_DISCOVERY_INTERVAL", 10*time.Second),
	}
	c.LB.Algorithm = l.Enum("LB_ALGORITHM", RoundRobin, Algorithms...)
	c.LB.ProxyProtocol = l.Enum("LB_PROXY_PROTOCOL", "v2", "v2", "v1", "off")
	c.LB.ConnectTimeout = l.Duration("LB_CONNECT_TIMEOUT", 3*time.Second)
	c.LB.DrainTimeout = l.Duration("LB_DRAIN_TIMEOUT", 30*time.Second)
	c.LB.MaxConns = l.Int("LB_MAX_CONNECTIONS", 20000, 1, 1_000_000)
	c.LB.Health = HealthConfig{
		Interval: l.Duration("LB_HEALTH_INTERVAL", 2*time.Second),
		Timeout:  l.Duration("LB_HEALTH_TIMEOUT", time.Second),
		Rise:     l.Int("LB_HEALTH_RISE", 2, 1, 100),
		Fall:     l.Int("LB_HEALTH_FALL", 3, 1, 100),
		HTTPPath: l.String("LB_HEALTH_HTTP_PATH", ""),
		HTTPPort: l.Int("LB_HEALTH_HTTP_PORT", 8083, 1, 65535),
	}
	def := ":8082=>443"
	if p := l.String("PORT", ""); p != "" {
		def = p + "=>443" // the seed's PORT names the public listener
	}
	spec := l.String("LB_LISTENERS", def)
	ls, err := ParseListeners(spec)
	if err != nil {
		l.Errorf("LB_LISTENERS", "%v", err)
	}
	c.LB.Listeners = ls
	for _, b := range c.Backends {
		if strings.ContainsAny(b, "/ ") {
			l.Errorf("LB_BACKENDS", "%q is not a host or host:port", b)
		}
	}
	if len(c.Backends) == 0 && len(c.Operators) == 0 {
		l.Errorf("LB_BACKENDS", "is required when OPERATOR_URL is not set (no way to find edge proxies)")
	}
	return c
}

// ParseListeners parses "ADDR=>PORT[,ADDR=>PORT…]", e.g.
// ":8082=>443,:80=>8083". ADDR may be a bare port.
func ParseListeners(s string) ([]Listener, error) {
	var out []Listener
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		addr, port, ok := strings.Cut(item, "=>")
		if !ok {
			return nil, fmt.Errorf("%q: want ADDR=>PORT", item)
		}
		addr, port = strings.TrimSpace(addr), strings.TrimSpace(port)
		if _, err := strconv.Atoi(addr); err == nil {
			addr = ":" + addr
		}
		if _, p, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("%q: bad listen address", item)
		} else if n, err := strconv.Atoi(p); err != nil || n < 0 || n > 65535 {
			return nil, fmt.Errorf("%q: bad listen port", item)
		}
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("%q: bad target port", item)
		}
		out = append(out, Listener{Addr: addr, TargetPort: n})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no listeners in %q", s)
	}
	return out, nil
}
