// Package apiclient is a small client of the operator's public API. It
// imports no server code, so the CLI that uses it stays free of database,
// netlink and ACME dependencies.
package apiclient

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// Client talks to one operator.
type Client struct {
	BaseURL string
	Token   string
	HTTP    *http.Client
}

// New returns a client for baseURL.
func New(baseURL, token string) *Client {
	return &Client{BaseURL: strings.TrimRight(baseURL, "/"), Token: token, HTTP: &http.Client{Timeout: 60 * time.Second}}
}

// Error is an API error response.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("operator answered %d", e.Status)
	}
	return e.Message
}

// Do sends a request with a JSON body (nil for none) and decodes the JSON
// answer into out (nil to discard). Extra headers come in pairs.
func (c *Client) Do(ctx context.Context, method, path string, body, out any, headers ...string) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, rd)
	if err != nil {
		return err
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the operator at %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 400 && resp.StatusCode != 422 {
		return apiError(resp.StatusCode, b)
	}
	if out != nil && len(b) > 0 {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("unexpected answer from the operator: %w", err)
		}
	}
	return nil
}

// Upload sends body as is (of the given content type) and decodes the
// JSON answer into out. It has no overall timeout: ctx bounds it.
func (c *Client) Upload(ctx context.Context, method, path, contentType string, body io.Reader, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, body)
	if err != nil {
		return err
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	req.Header.Set("Content-Type", contentType)
	hc := *c.HTTP
	hc.Timeout = 0
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the operator at %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 400 {
		return apiError(resp.StatusCode, b)
	}
	if out != nil && len(b) > 0 {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("unexpected answer from the operator: %w", err)
		}
	}
	return nil
}

func apiError(status int, body []byte) *Error {
	var e struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	_ = json.Unmarshal(body, &e)
	return &Error{Status: status, Code: e.Error.Code, Message: e.Error.Message}
}

// Stream opens a streaming GET (NDJSON) and returns its body.
func (c *Client) Stream(ctx context.Context, path string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.BaseURL+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	hc := *c.HTTP
	hc.Timeout = 0
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the operator at %s: %w", c.BaseURL, err)
	}
	if resp.StatusCode >= 400 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		return nil, apiError(resp.StatusCode, b)
	}
	return resp.Body, nil
}

// Deployment is the subset of the deployment document the CLI shows.
type Deployment struct {
	ID            string                     `json:"id"`
	Project       string                     `json:"project"`
	Status        string                     `json:"status"`
	URL           string                     `json:"url"`
	ProductionURL string                     `json:"production_url"`
	Image         string                     `json:"image"`
	CommitSHA     string                     `json:"commit_sha"`
	CommitMessage string                     `json:"commit_message"`
	Preview       bool                       `json:"preview"`
	Active        bool                       `json:"active"`
	FailureReason string                     `json:"failure_reason"`
	CreatedAt     time.Time                  `json:"created_at"`
	BuildingAt    *time.Time                 `json:"building_at"`
	PreparingAt   *time.Time                 `json:"preparing_at"`
	StartingAt    *time.Time                 `json:"starting_at"`
	HealthyAt     *time.Time                 `json:"healthy_at"`
	ActiveAt      *time.Time                 `json:"active_at"`
	FinishedAt    *time.Time                 `json:"finished_at"`
	Regions       map[string]RegionInstances `json:"regions"`
	Build         *DeploymentBuild           `json:"build"` // a deployment built from source
}

// DeploymentBuild is the build of a deployment built from source.
type DeploymentBuild struct {
	ID    string `json:"id"`
	State string `json:"state"` // queued, running, succeeded, failed, canceled
	Error string `json:"error"`
}

// RegionInstances counts a region's instances.
type RegionInstances struct {
	Desired int `json:"desired"`
	Running int `json:"running"`
	Healthy int `json:"healthy"`
}
