package geodns

import (
	"github.com/zeitwork/zeitwork/internal/envconfig"
)

// ServiceConfig is what zeitwork-dns reads from its environment.
type ServiceConfig struct {
	Listen     string // DNS_LISTEN: UDP and TCP
	AdminAddr  string // DNS_ADMIN_ADDR: /health*, /metrics
	ConfigPath string // DNS_CONFIG: the JSON configuration
}

// LoadServiceConfig reads the environment, recording problems in l.
func LoadServiceConfig(l *envconfig.Loader) ServiceConfig {
	return ServiceConfig{
		Listen:     l.Addr("DNS_LISTEN", ":53"),
		AdminAddr:  l.Addr("DNS_ADMIN_ADDR", ":8086"),
		ConfigPath: l.File("DNS_CONFIG", "", true),
	}
}
