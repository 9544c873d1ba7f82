// Package agents is the operator's client of the node agent API
// (docs/ARCHITECTURE.md, "Node agent API"): create, list and delete
// instances, and stream their logs. Every call carries the cluster token.
package agents

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"
)

// Spec is the body of POST /instances.
type Spec struct {
	ID           string            `json:"id"`
	DeploymentID string            `json:"deployment_id"`
	Image        string            `json:"image"`
	Port         int               `json:"port"`
	VCPUs        int               `json:"vcpus"`
	MemoryMiB    int               `json:"memory_mib"`
	Env          map[string]string `json:"env"`
	HealthPath   string            `json:"health_path"`
}

// Instance is the part of the agent's instance document the operator reads.
type Instance struct {
	ID       string `json:"id"`
	State    string `json:"state"`
	Healthy  bool   `json:"healthy"`
	IP       string `json:"ip"`
	Restarts int    `json:"restarts"`
	Error    string `json:"error"`
}

// Client calls node agents; base addresses come from their registration.
type Client struct {
	token string
	http  *http.Client
}

// New returns a client authenticating with the cluster token.
func New(clusterToken string) *Client {
	return &Client{token: clusterToken, http: &http.Client{Timeout: 15 * time.Second}}
}

// Create asks the agent at base to run an instance; agents treat a
// repeated create of the same id as a no-op.
func (c *Client) Create(ctx context.Context, base string, spec Spec) error {
	return c.call(ctx, http.MethodPost, base, "/instances", spec, nil)
}

// Delete stops and removes an instance; an unknown instance is not an error.
func (c *Client) Delete(ctx context.Context, base, id string) error {
	return c.call(ctx, http.MethodDelete, base, "/instances/"+url.PathEscape(id), nil, nil)
}

// List returns every instance the agent runs.
func (c *Client) List(ctx context.Context, base string) ([]Instance, error) {
	var out []Instance
	return out, c.call(ctx, http.MethodGet, base, "/instances", nil, &out)
}

// Logs opens an instance's NDJSON log stream ({"time","stream","line"} per
// line); with follow it stays open until ctx ends.
func (c *Client) Logs(ctx context.Context, base, id string, follow bool) (io.ReadCloser, error) {
	q := "?follow=0"
	if follow {
		q = "?follow=1"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/instances/"+url.PathEscape(id)+"/logs"+q, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	hc := *c.http
	hc.Timeout = 0 // a followed stream lives as long as its request
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("logs of %s: status %d", id, resp.StatusCode)
	}
	return resp.Body, nil
}

func (c *Client) call(ctx context.Context, method, base, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound && method == http.MethodDelete {
		return nil
	}
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s %s: status %d: %s", method, path, resp.StatusCode, bytes.TrimSpace(msg))
	}
	if out != nil {
		if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(out); err != nil {
			return fmt.Errorf("%s %s: bad answer: %w", method, path, err)
		}
	}
	return nil
}
