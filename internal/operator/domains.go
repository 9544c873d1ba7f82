package operator

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/db"
	"github.com/zeitwork/zeitwork/internal/httpjson"
	"github.com/zeitwork/zeitwork/internal/operator/domains"
	"github.com/zeitwork/zeitwork/internal/operator/names"
)

// Domain is the API's custom domain document.
type Domain struct {
	ID                uuid.UUID          `json:"id"`
	ProjectID         uuid.UUID          `json:"project_id"`
	Name              string             `json:"name"`
	Verified          bool               `json:"verified"`
	VerifiedAt        *time.Time         `json:"verified_at,omitempty"`
	LastCheckedAt     *time.Time         `json:"last_checked_at,omitempty"`
	LastError         string             `json:"last_error,omitempty"`
	CreatedAt         time.Time          `json:"created_at"`
	DNSRecords        []domains.Record   `json:"dns_records"`
	Certificate       *DomainCertificate `json:"certificate"`
	verificationToken string
}

func (o *Operator) records(d *Domain) []domains.Record {
	return o.verify.Records(d.Name, d.verificationToken)
}

func (o *Operator) addDomain(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	var req struct {
		Name string `json:"name"`
	}
	if err := decode(r, &req); err != nil {
		return err
	}
	name, err := names.NormalizeDomain(req.Name)
	if err != nil {
		return invalid("%v", err)
	}
	if name == o.cfg.AppsDomain || strings.HasSuffix(name, "."+o.cfg.AppsDomain) {
		return invalid("%s is under the platform's apps domain", name)
	}
	d := &Domain{ID: newID(), ProjectID: p.ID, Name: name, CreatedAt: time.Now().UTC(), verificationToken: domains.NewToken()}
	_, err = o.pool.Exec(r.Context(), Q("DomainInsert"), d.ID, p.ID, who(r).OrgID, d.Name, d.verificationToken)
	if db.IsUniqueViolation(err) {
		return fmt.Errorf("%w: %s is already added to a project", errConflict, name)
	}
	if err != nil {
		return err
	}
	d.DNSRecords = o.records(d)
	if d.Certificate, err = o.certificate(r.Context(), d.Name); err != nil {
		return err
	}
	httpjson.Write(w, 201, d)
	return nil
}

func scanDomain(row pgx.Row, d *Domain) error {
	return row.Scan(&d.ID, &d.Name, &d.verificationToken, &d.VerifiedAt, &d.LastCheckedAt, &d.LastError, &d.CreatedAt)
}

func (o *Operator) listDomains(w http.ResponseWriter, r *http.Request) error {
	p, err := o.project(r)
	if err != nil {
		return err
	}
	rows, err := o.pool.Query(r.Context(), Q("DomainsList"), p.ID)
	if err != nil {
		return err
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (*Domain, error) {
		d := &Domain{ProjectID: p.ID}
		err := scanDomain(row, d)
		d.Verified = d.VerifiedAt != nil
		d.DNSRecords = o.records(d)
		return d, err
	})
	if err != nil {
		return err
	}
	for _, d := range out {
		if d.Certificate, err = o.certificate(r.Context(), d.Name); err != nil {
			return err
		}
	}
	httpjson.Write(w, 200, map[string]any{"domains": out})
	return nil
}

func (o *Operator) domain(r *http.Request) (*Domain, error) {
	d := &Domain{}
	err := o.pool.QueryRow(r.Context(), Q("DomainGet"), who(r).OrgID, strings.ToLower(r.PathValue("id"))).Scan(
		&d.ID, &d.ProjectID, &d.Name, &d.verificationToken, &d.VerifiedAt, &d.LastCheckedAt, &d.LastError, &d.CreatedAt)
	if isNoRows(err) {
		return nil, notFound("domain " + r.PathValue("id"))
	}
	if err != nil {
		return nil, err
	}
	d.Verified = d.VerifiedAt != nil
	d.DNSRecords = o.records(d)
	d.Certificate, err = o.certificate(r.Context(), d.Name)
	if err != nil {
		return nil, err
	}
	return d, nil
}

func (o *Operator) getDomain(w http.ResponseWriter, r *http.Request) error {
	d, err := o.domain(r)
	if err != nil {
		return err
	}
	httpjson.Write(w, 200, d)
	return nil
}

func (o *Operator) verifyDomain(w http.ResponseWriter, r *http.Request) error {
	d, err := o.domain(r)
	if err != nil {
		return err
	}
	if err := o.checkDomain(r.Context(), d.ID, d.Name, d.verificationToken, nil, true); err != nil {
		return err
	}
	d, err = o.domain(r)
	if err != nil {
		return err
	}
	code := 200
	if !d.Verified {
		code = 422
	}
	httpjson.Write(w, code, d)
	return nil
}

func (o *Operator) removeDomain(w http.ResponseWriter, r *http.Request) error {
	d, err := o.domain(r)
	if err != nil {
		return err
	}
	err = o.tx(r.Context(), func(tx pgx.Tx) error {
		if _, err := tx.Exec(r.Context(), Q("DomainDelete"), d.ID, who(r).OrgID); err != nil {
			return err
		}
		_, err := tx.Exec(r.Context(), Q("BumpRoutes"))
		return err
	})
	if err != nil {
		return err
	}
	w.WriteHeader(204)
	return nil
}

// checkDomain looks the domain up in DNS and records the result; a change
// of verification bumps the route table in the same transaction. A
// background re-check (force false) writes only if nobody checked the
// domain since it read checkedAt, so a slow stale lookup never overwrites
// the answer of a newer explicit verify.
func (o *Operator) checkDomain(ctx context.Context, id uuid.UUID, name, token string, checkedAt *time.Time, force bool) error {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	ok, reason := o.verify.Check(cctx, name, token)
	cancel()
	return o.tx(ctx, func(tx pgx.Tx) error {
		var was, last *time.Time
		if err := tx.QueryRow(ctx, Q("DomainLock"), id).Scan(&was, &last); err != nil {
			return err
		}
		if !force && !sameTime(last, checkedAt) {
			return nil
		}
		if _, err := tx.Exec(ctx, Q("DomainSetVerified"), id, ok, reason); err != nil {
			return err
		}
		if (was != nil) != ok {
			o.log.Info("domain verification changed", "domain", name, "verified", ok, "reason", reason)
			_, err := tx.Exec(ctx, Q("BumpRoutes"))
			return err
		}
		return nil
	})
}

func sameTime(a, b *time.Time) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return a.Equal(*b)
}

// recheckDomains re-verifies domains periodically (leader only).
func (o *Operator) recheckDomains(ctx context.Context) error {
	rows, err := o.pool.Query(ctx, Q("DomainsToRecheck"), fmt.Sprintf("%d seconds", int(o.cfg.DomainRecheck.Seconds())))
	if err != nil {
		return err
	}
	type dom struct {
		id          uuid.UUID
		name, token string
		checkedAt   *time.Time
	}
	ds, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (dom, error) {
		var d dom
		return d, row.Scan(&d.id, &d.name, &d.token, &d.checkedAt)
	})
	if err != nil {
		return err
	}
	for _, d := range ds {
		if err := o.checkDomain(ctx, d.id, d.name, d.token, d.checkedAt, false); err != nil {
			return err
		}
	}
	return nil
}
