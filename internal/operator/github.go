package operator

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/httpjson"
	"github.com/zeitwork/zeitwork/internal/operator/webhook"
)

// webhook receives GitHub deliveries. The signature is checked before the
// body is parsed. The delivery record and the pending deployments it
// creates are written in one short transaction, so a redelivery after a
// failure is retried and a duplicate changes nothing; pulling and booting
// happen later in the reconciler, so the answer comes well within 1 s.
func (o *Operator) webhook(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 25<<20))
	if err != nil {
		writeErr(w, invalid("cannot read body"))
		return
	}
	if !webhook.Verify(o.cfg.WebhookSecret, r.Header.Get("X-Hub-Signature-256"), body) {
		o.m.webhooks.WithLabelValues("bad_signature").Inc()
		writeErr(w, fmt.Errorf("%w: bad or missing X-Hub-Signature-256", errUnauthorized))
		return
	}
	event := r.Header.Get("X-GitHub-Event")
	delivery := r.Header.Get("X-GitHub-Delivery")
	switch event {
	case "ping":
		httpjson.Write(w, 200, map[string]any{"ok": true, "message": "pong"})
		return
	case "push":
	default:
		httpjson.Write(w, 202, map[string]any{"ok": true, "ignored": "event " + event})
		return
	}
	if delivery == "" || len(delivery) > 100 {
		writeErr(w, invalid("X-GitHub-Delivery is required"))
		return
	}
	ev, err := webhook.ParsePush(body)
	if err != nil {
		writeErr(w, invalid("%v", err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 900*time.Millisecond)
	defer cancel()
	var created []string
	duplicate := false
	err = o.tx(ctx, func(tx pgx.Tx) error {
		created = nil
		tag, err := tx.Exec(ctx, Q("WebhookDeliveryInsert"), delivery, event)
		if err != nil {
			return err
		}
		if duplicate = tag.RowsAffected() == 0; duplicate {
			return nil
		}
		if !ev.Deploys() {
			_, err := tx.Exec(ctx, Q("WebhookDeliveryUpdate"), delivery, "ignored", nil, nil)
			return err
		}
		rows, err := tx.Query(ctx, Q("ProjectsByRepo"), ev.Repository.FullName)
		if err != nil {
			return err
		}
		type proj struct {
			id, org                                   uuid.UUID
			name, orgName, branch, tmpl, repo, gitURL string
		}
		projs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (proj, error) {
			var p proj
			return p, row.Scan(&p.id, &p.org, &p.name, &p.branch, &p.tmpl, &p.orgName, &p.repo, &p.gitURL)
		})
		if err != nil {
			return err
		}
		status := "no_project"
		for _, p := range projs {
			// With an image template the commit names an image; without
			// one the commit is built from source.
			pr := &Project{ID: p.id, Name: p.name, ImageTemplate: p.tmpl, GithubRepo: p.repo, GitURL: p.gitURL}
			id, err := o.newDeployment(ctx, tx, principal{OrgID: p.org, OrgName: p.orgName}, pr,
				deployRequest{CommitSHA: ev.After, CommitMessage: ev.CommitMessage(), Branch: ev.Branch(), Preview: ev.Branch() != p.branch}, "")
			if err != nil {
				return err
			}
			status = "deployed"
			if _, err := tx.Exec(ctx, Q("WebhookDeliveryUpdate"), delivery, status, p.id, id); err != nil {
				return err
			}
			created = append(created, id.String())
		}
		if status != "deployed" {
			_, err := tx.Exec(ctx, Q("WebhookDeliveryUpdate"), delivery, status, nil, nil)
			return err
		}
		return nil
	})
	switch {
	case err != nil:
		o.m.webhooks.WithLabelValues("error").Inc()
		writeErr(w, err)
	case duplicate:
		o.m.webhooks.WithLabelValues("duplicate").Inc()
		httpjson.Write(w, 200, map[string]any{"ok": true, "duplicate": true})
	case !ev.Deploys():
		o.m.webhooks.WithLabelValues("ignored").Inc()
		httpjson.Write(w, 202, map[string]any{"ok": true, "ignored": "branch deletion or non-branch ref"})
	default:
		if created == nil {
			created = []string{}
		}
		o.m.webhooks.WithLabelValues("deployed").Inc()
		httpjson.Write(w, 202, map[string]any{"ok": true, "deployments": created})
	}
}
