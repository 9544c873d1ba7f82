package geodns

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// MaxConfigSize bounds the configuration file; a larger one is rejected.
const MaxConfigSize = 1 << 20

// Config is the JSON configuration file (DNS_CONFIG). See
// deployments/config/geodns.json for an example.
type Config struct {
	// TTL (seconds) of geo answers and of static records without their own.
	TTL uint32 `json:"ttl"`
	// NegativeTTL (seconds) is the SOA minimum: how long resolvers cache
	// NXDOMAIN and NODATA. Default: TTL.
	NegativeTTL uint32 `json:"negative_ttl,omitempty"`
	// Zones this server is authoritative for.
	Zones []Zone `json:"zones"`
	// Geo names are answered with the load balancers of the client's
	// nearest healthy region. A name may be a wildcard ("*.zeitwork.app").
	Geo []GeoName `json:"geo"`
	// Records are static A, AAAA, CNAME and TXT records.
	Records []Record `json:"records,omitempty"`
	// Regions in the order that is the default order unless DefaultOrder
	// is set.
	Regions []Region `json:"regions"`
	// DefaultOrder is the region order for clients in no region's subnets.
	DefaultOrder []string `json:"default_order,omitempty"`
	// Health is how every load balancer is checked.
	Health Health `json:"health"`
}

// Zone is one authoritative zone: its SOA and NS records are served at the
// apex.
type Zone struct {
	Name string `json:"name"`
	// NS names the zone's name servers (at least one).
	NS []string `json:"ns"`
	// Hostmaster is the SOA RNAME (default hostmaster.<zone>).
	Hostmaster string `json:"hostmaster,omitempty"`
	// Serial is the SOA serial; 0 means the load time in Unix seconds, so
	// every reload raises it.
	Serial uint32 `json:"serial,omitempty"`
}

// GeoName is a name answered by region. Region pins it to one region
// (a regional endpoint such as us-east.zeitwork.com); empty means the
// client's region with its fallbacks.
type GeoName struct {
	Name   string `json:"name"`
	Region string `json:"region,omitempty"`
}

// Record is a static record.
type Record struct {
	Name  string `json:"name"`
	Type  string `json:"type"` // A, AAAA, CNAME, TXT
	Value string `json:"value"`
	TTL   uint32 `json:"ttl,omitempty"`
}

// Region is one region: the client subnets it serves, its load balancers
// and the regions that answer for it when all of its load balancers are
// down.
type Region struct {
	Name          string         `json:"name"`
	Subnets       []string       `json:"subnets,omitempty"`
	LoadBalancers []LoadBalancer `json:"load_balancers"`
	Fallback      []string       `json:"fallback,omitempty"`
}

// LoadBalancer is one load balancer address. In JSON it is either the
// address as a string or an object; Check overrides the host:port the
// health check probes (default Address and the health port).
type LoadBalancer struct {
	Address string `json:"address"`
	Check   string `json:"check,omitempty"`
}

// UnmarshalJSON accepts "10.0.0.1" as well as {"address":"10.0.0.1"}.
func (lb *LoadBalancer) UnmarshalJSON(b []byte) error {
	if s := bytes.TrimSpace(b); len(s) > 0 && s[0] == '"' {
		return json.Unmarshal(s, &lb.Address)
	}
	type plain LoadBalancer
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var p plain
	if err := dec.Decode(&p); err != nil {
		return err
	}
	*lb = LoadBalancer(p)
	return nil
}

// Health configures the load balancer health checks.
type Health struct {
	// Check is "http" (GET http://<lb>:<port><path>, 2xx is healthy) or
	// "tcp" (a connect to <lb>:<port>).
	Check    string   `json:"check"`
	Port     int      `json:"port"`
	Path     string   `json:"path,omitempty"`
	Interval Duration `json:"interval"`
	Timeout  Duration `json:"timeout"`
	// Fall consecutive failures mark a load balancer down, Rise
	// consecutive successes mark it up again.
	Fall int `json:"fall"`
	Rise int `json:"rise"`
}

// Duration is a time.Duration written as a string ("2s") in JSON.
type Duration time.Duration

// UnmarshalJSON parses "2s", "500ms" (or a number of seconds).
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var n float64
		if err2 := json.Unmarshal(b, &n); err2 != nil || n < 0 || n > 86400 {
			return fmt.Errorf("duration %s is not a string like \"2s\" or a number of seconds", b)
		}
		*d = Duration(n * float64(time.Second))
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil || v < 0 {
		return fmt.Errorf("duration %q is not like \"2s\"", s)
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// LoadFile reads and parses the configuration file at path.
func LoadFile(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("DNS_CONFIG: cannot read: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("DNS_CONFIG: cannot read %s: %w", path, err)
	}
	if len(b) > MaxConfigSize {
		return nil, fmt.Errorf("DNS_CONFIG: %s is larger than %d bytes", path, MaxConfigSize)
	}
	c, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("DNS_CONFIG: %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes and validates a configuration. Unknown fields are errors
// (a typo must not silently drop a setting); every problem is reported in
// one error.
func Parse(b []byte) (*Config, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if dec.More() {
		return nil, errors.New("invalid JSON: more than one value")
	}
	if _, err := compile(&c, time.Now()); err != nil {
		return nil, err
	}
	return &c, nil
}

// problems collects validation errors.
type problems []string

func (p *problems) add(format string, args ...any) { *p = append(*p, fmt.Sprintf(format, args...)) }

func (p problems) err() error {
	if len(p) == 0 {
		return nil
	}
	const max = 20
	if len(p) > max {
		p = append(p[:max:max], fmt.Sprintf("and %d more", len(p)-max))
	}
	return errors.New("invalid config: " + strings.Join(p, "; "))
}

// fqdn validates a domain name and returns it lower-cased and fully
// qualified. Wildcards are allowed only as the whole first label.
func fqdn(s string, wildcard bool) (string, error) {
	s = strings.ToLower(strings.TrimSpace(s))
	if s == "" {
		return "", errors.New("empty name")
	}
	s = dns.Fqdn(s)
	if _, ok := dns.IsDomainName(s); !ok || s == "." {
		return "", fmt.Errorf("%q is not a domain name", s)
	}
	for i, l := range dns.SplitDomainName(s) {
		if l == "*" && i == 0 && wildcard {
			continue
		}
		if strings.ContainsAny(l, "*\\ ") || strings.HasPrefix(l, "-") || strings.HasSuffix(l, "-") {
			return "", fmt.Errorf("%q has an invalid label %q", s, l)
		}
		for _, r := range l {
			if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return "", fmt.Errorf("%q has an invalid label %q", s, l)
			}
		}
	}
	return s, nil
}

func parseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(strings.TrimSpace(s))
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("%q is not an IP address", s)
	}
	return a.Unmap(), nil
}

func checkHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not a host:port", s)
	}
	if host == "" {
		return fmt.Errorf("%q has no host", s)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%q has an invalid port", s)
	}
	return nil
}
