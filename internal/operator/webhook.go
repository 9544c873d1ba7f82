package operator

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/google/uuid"
)

// PushEvent is the part of GitHub's push payload Zeitwork uses.
type PushEvent struct {
	Ref        string `json:"ref"`
	After      string `json:"after"`
	Deleted    bool   `json:"deleted"`
	Repository struct {
		FullName string `json:"full_name"`
	} `json:"repository"`
}

// VerifySignature checks X-Hub-Signature-256 ("sha256=<hex HMAC>") in
// constant time.
func VerifySignature(secret, header string, body []byte) bool {
	sig, ok := strings.CutPrefix(header, "sha256=")
	if !ok || secret == "" {
		return false
	}
	got, err := hex.DecodeString(sig)
	if err != nil {
		return false
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return hmac.Equal(got, mac.Sum(nil))
}

// ParsePush decodes and validates a push payload.
func ParsePush(body []byte) (*PushEvent, error) {
	var ev PushEvent
	if err := json.Unmarshal(body, &ev); err != nil {
		return nil, fmt.Errorf("malformed push payload: %w", err)
	}
	if ev.Repository.FullName == "" || !strings.HasPrefix(ev.Ref, "refs/") {
		return nil, fmt.Errorf("push payload lacks repository.full_name or ref")
	}
	if strings.Trim(ev.After, "0") != "" && !validSHA(ev.After) {
		return nil, fmt.Errorf("push payload has a bad after %q", ev.After)
	}
	return &ev, nil
}

const zeroSHA = "0000000000000000000000000000000000000000"

// webhook receives GitHub deliveries. The signature is checked before the
// body is parsed; the answer comes at once and deployments are created by
// the request's own transaction (they are tiny) while building and
// booting happen in the reconciler.
func (o *Operator) webhook(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 25<<20))
	if err != nil {
		writeErr(w, invalid("cannot read body"))
		return
	}
	if !VerifySignature(o.cfg.WebhookSecret, r.Header.Get("X-Hub-Signature-256"), body) {
		writeErr(w, fmt.Errorf("%w: bad or missing X-Hub-Signature-256", errUnauthorized))
		return
	}
	event := r.Header.Get("X-GitHub-Event")
	delivery := r.Header.Get("X-GitHub-Delivery")
	switch event {
	case "ping":
		writeJSON(w, 200, map[string]any{"ok": true, "message": "pong"})
		return
	case "push":
	default:
		writeJSON(w, 202, map[string]any{"ok": true, "ignored": "event " + event})
		return
	}
	if delivery == "" || len(delivery) > 100 {
		writeErr(w, invalid("X-GitHub-Delivery is required"))
		return
	}
	ev, err := ParsePush(body)
	if err != nil {
		writeErr(w, invalid("%v", err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 900*time.Millisecond)
	defer cancel()
	tag, err := o.pool.Exec(ctx, Q("WebhookDeliveryInsert"), delivery, event)
	if err != nil {
		writeErr(w, err)
		return
	}
	if tag.RowsAffected() == 0 {
		writeJSON(w, 200, map[string]any{"ok": true, "duplicate": true})
		return
	}
	if ev.Deleted || ev.After == zeroSHA || !strings.HasPrefix(ev.Ref, "refs/heads/") {
		_, _ = o.pool.Exec(ctx, Q("WebhookDeliveryUpdate"), delivery, "ignored", nil, nil)
		writeJSON(w, 202, map[string]any{"ok": true, "ignored": "branch deletion or non-branch ref"})
		return
	}
	branch := strings.TrimPrefix(ev.Ref, "refs/heads/")
	rows, err := o.pool.Query(ctx, Q("ProjectsByRepo"), ev.Repository.FullName)
	if err != nil {
		writeErr(w, err)
		return
	}
	type proj struct {
		id, org            uuid.UUID
		name, branch, tmpl string
	}
	var projs []proj
	for rows.Next() {
		var p proj
		if err := rows.Scan(&p.id, &p.org, &p.name, &p.branch, &p.tmpl); err != nil {
			rows.Close()
			writeErr(w, err)
			return
		}
		projs = append(projs, p)
	}
	rows.Close()
	var created []string
	for _, p := range projs {
		if p.tmpl == "" {
			continue
		}
		var orgName string
		if err := o.pool.QueryRow(ctx, Q("OrgName"), p.org).Scan(&orgName); err != nil {
			writeErr(w, err)
			return
		}
		pr := &Project{ID: p.id, Name: p.name, ImageTemplate: p.tmpl}
		id, err := o.newDeployment(ctx, principal{OrgID: p.org, OrgName: orgName}, pr,
			deployRequest{CommitSHA: ev.After, Branch: branch, Preview: branch != p.branch}, "")
		if err != nil {
			writeErr(w, err)
			return
		}
		_, _ = o.pool.Exec(ctx, Q("WebhookDeliveryUpdate"), delivery, "deployed", p.id, id)
		created = append(created, id.String())
	}
	writeJSON(w, 202, map[string]any{"ok": true, "deployments": created})
}
