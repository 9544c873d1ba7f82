// Package agents is the operator's client of the node agent API
// (docs/ARCHITECTURE.md, "Node agent API"): create, list and delete
// instances, and stream their logs; start, read, cancel and delete builds
// and stream their logs (internal/build is that contract). Every call
// carries the cluster token.
package agents

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/zeitwork/zeitwork/internal/build"
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

// listTimeout bounds List: an agent answers it from memory, so a node
// that has not answered within it is not answering (the leader's orphan
// scan waits for it in its pass).
const listTimeout = 3 * time.Second

// List returns every instance the agent runs.
func (c *Client) List(ctx context.Context, base string) ([]Instance, error) {
	ctx, cancel := context.WithTimeout(ctx, listTimeout)
	defer cancel()
	var out []Instance
	return out, c.call(ctx, http.MethodGet, base, "/instances", nil, &out)
}

// StatusError is a node agent's answer outside 2xx.
type StatusError struct {
	Method, Path string
	Status       int
	Message      string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("%s %s: status %d: %s", e.Method, e.Path, e.Status, e.Message)
}

// IsNotFound reports whether err is the agent's 404.
func IsNotFound(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && se.Status == http.StatusNotFound
}

// IsStatus reports whether err is the agent's answer (any status), not a
// failure to reach it.
func IsStatus(err error) bool {
	var se *StatusError
	return errors.As(err, &se)
}

// IsRejected reports whether the agent refused a request's content (400,
// 413, 422), so repeating it cannot help; other answers (a conflict while
// the agent shuts down, 429, 5xx) may pass on a later try.
func IsRejected(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && (se.Status == http.StatusBadRequest || se.Status == http.StatusRequestEntityTooLarge ||
		se.Status == http.StatusUnprocessableEntity)
}

// CreateBuild asks the agent at base to run a build (POST /builds);
// agents treat a repeated create of the same id as a no-op.
func (c *Client) CreateBuild(ctx context.Context, base string, spec build.Spec) error {
	return c.call(ctx, http.MethodPost, base, "/builds", spec, nil)
}

// GetBuild reads a build's status; IsNotFound tells an unknown build.
func (c *Client) GetBuild(ctx context.Context, base, id string) (*build.Status, error) {
	var st build.Status
	if err := c.call(ctx, http.MethodGet, base, "/builds/"+url.PathEscape(id), nil, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// CancelBuild stops a build; an unknown or finished build is not an error.
func (c *Client) CancelBuild(ctx context.Context, base, id string) error {
	err := c.call(ctx, http.MethodPost, base, "/builds/"+url.PathEscape(id)+"/cancel", nil, nil)
	if IsNotFound(err) {
		return nil
	}
	return err
}

// DeleteBuild forgets a finished build (its log and files); an unknown
// build is not an error.
func (c *Client) DeleteBuild(ctx context.Context, base, id string) error {
	return c.call(ctx, http.MethodDelete, base, "/builds/"+url.PathEscape(id), nil, nil)
}

// BuildLogs opens a build's NDJSON log (build.LogLine per line) from the
// line after since (since < 0: from the start); with follow it stays open
// until the build ends or ctx does.
func (c *Client) BuildLogs(ctx context.Context, base, id string, follow bool, since int) (io.ReadCloser, error) {
	q := url.Values{}
	if follow {
		q.Set("follow", "1")
	}
	if since >= 0 {
		q.Set("since", strconv.Itoa(since))
	}
	path := "/builds/" + url.PathEscape(id) + "/logs"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	return c.stream(ctx, path, base)
}

// Logs opens an instance's NDJSON log stream ({"time","stream","line"} per
// line); with follow it stays open until ctx ends.
func (c *Client) Logs(ctx context.Context, base, id string, follow bool) (io.ReadCloser, error) {
	q := "?follow=0"
	if follow {
		q = "?follow=1"
	}
	return c.stream(ctx, "/instances/"+url.PathEscape(id)+"/logs"+q, base)
}

func (c *Client) stream(ctx context.Context, path, base string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
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
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, &StatusError{Method: http.MethodGet, Path: path, Status: resp.StatusCode, Message: string(bytes.TrimSpace(msg))}
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
		return &StatusError{Method: method, Path: path, Status: resp.StatusCode, Message: string(bytes.TrimSpace(msg))}
	}
	if out != nil {
		if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(out); err != nil {
			return fmt.Errorf("%s %s: bad answer: %w", method, path, err)
		}
	}
	return nil
}
