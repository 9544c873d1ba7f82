package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/zeitwork/zeitwork/internal/fsutil"
)

// fileConfig is what `zeitwork login` and `zeitwork link` remember, stored
// 0600 under the user's config directory.
type fileConfig struct {
	APIURL string            `json:"api_url,omitempty"`
	Token  string            `json:"token,omitempty"`
	Links  map[string]string `json:"links,omitempty"` // absolute directory → project
}

func configPath() (string, error) {
	if p := os.Getenv("ZEITWORK_CONFIG"); p != "" {
		return p, nil
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return "", fmt.Errorf("cannot find a config directory: %w", err)
	}
	return filepath.Join(dir, "zeitwork", "config.json"), nil
}

func loadConfig() (*fileConfig, error) {
	p, err := configPath()
	if err != nil {
		return nil, err
	}
	c := &fileConfig{}
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, c); err != nil {
		return nil, fmt.Errorf("%s is not valid JSON: %w", p, err)
	}
	return c, nil
}

func (c *fileConfig) save() error {
	p, err := configPath()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(c, "", "  ")
	return fsutil.WriteFile(p, b, 0o600)
}
