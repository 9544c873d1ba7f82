package monitoring

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/zeitwork/zeitwork/internal/fsutil"
)

// TargetGroup is one entry of a Prometheus file_sd file.
type TargetGroup struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

// Targets writes the node agents of the node table as a Prometheus
// file_sd targets file: one group per node with its address as target and
// region, node_id and hostname as labels. Nodes that are down stay in the
// file (Prometheus then reports up 0 for them) until they are removed.
type Targets struct {
	Path  string        // the file written (OBSERVABILITY_SD_FILE)
	Every time.Duration // how often the node table is read again; default 5s
	Pool  *pgxpool.Pool
	Log   *slog.Logger

	last []byte
}

// Run rewrites the file whenever the node table changes, until ctx ends.
func (t *Targets) Run(ctx context.Context) {
	every := t.Every
	if every <= 0 {
		every = 5 * time.Second
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		if err := t.Write(ctx); err != nil && ctx.Err() == nil {
			t.Log.Warn("cannot write the Prometheus targets file", "path", t.Path, "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// Write reads the node table and writes the file when its content differs
// from what this writer last wrote (or the file is gone).
func (t *Targets) Write(ctx context.Context) error {
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rows, err := t.Pool.Query(qctx, q("MonNodes"))
	if err != nil {
		return err
	}
	var nodes []Node
	for rows.Next() {
		var n Node
		var age float64
		var vcpus, mem, allocVCPUs, allocMem int64
		if err := rows.Scan(&n.ID, &n.Hostname, &n.Region, &n.State, &n.Address, &age, &vcpus, &mem, &allocVCPUs, &allocMem); err != nil {
			rows.Close()
			return err
		}
		nodes = append(nodes, n)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	data, err := TargetsFile(nodes)
	if err != nil {
		return err
	}
	if bytes.Equal(data, t.last) {
		if _, err := os.Stat(t.Path); err == nil {
			return nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(t.Path), 0o755); err != nil {
		return err
	}
	if err := fsutil.WriteFile(t.Path, data, 0o644); err != nil {
		return err
	}
	t.last = data
	return nil
}

// Node is what the targets file says about one node.
type Node struct {
	ID, Hostname, Region, State, Address string
}

// TargetsFile renders nodes as file_sd JSON. A node whose address is not
// an http(s) URL with a host is left out.
func TargetsFile(nodes []Node) ([]byte, error) {
	groups := []TargetGroup{}
	for _, n := range nodes {
		u, err := url.Parse(n.Address)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			continue
		}
		host := u.Host
		if u.Port() == "" {
			if u.Scheme == "https" {
				host += ":443"
			} else {
				host += ":80"
			}
		}
		groups = append(groups, TargetGroup{Targets: []string{host}, Labels: map[string]string{
			"region": n.Region, "node_id": n.ID, "hostname": n.Hostname, "__scheme__": u.Scheme,
		}})
	}
	b, err := json.MarshalIndent(groups, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("targets: %w", err)
	}
	return append(b, '\n'), nil
}
