package operator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/db"
)

// Domain is the API's custom domain document.
type Domain struct {
	ID                uuid.UUID   `json:"id"`
	ProjectID         uuid.UUID   `json:"project_id"`
	Name              string      `json:"name"`
	Verified          bool        `json:"verified"`
	VerifiedAt        *time.Time  `json:"verified_at,omitempty"`
	LastCheckedAt     *time.Time  `json:"last_checked_at,omitempty"`
	LastError         string      `json:"last_error,omitempty"`
	CreatedAt         time.Time   `json:"created_at"`
	DNSRecords        []DNSRecord `json:"dns_records"`
	verificationToken string
}

// DNSRecord is a record the customer creates (either one verifies).
type DNSRecord struct {
	Type  string `json:"type"`
	Name  string `json:"name"`
	Value string `json:"value"`
	Note  string `json:"note"`
}

func (o *Operator) records(d *Domain) []DNSRecord {
	return []DNSRecord{
		{Type: "CNAME", Name: d.Name, Value: o.cfg.EdgeHostname, Note: "routes traffic to Zeitwork and verifies the domain"},
		{Type: "TXT", Name: "_zeitwork." + d.Name, Value: d.verificationToken, Note: "verifies the domain without moving traffic yet (e.g. an apex with A records)"},
	}
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
	name, err := NormalizeDomain(req.Name)
	if err != nil {
		return invalid("%v", err)
	}
	if name == o.cfg.AppsDomain || strings.HasSuffix(name, "."+o.cfg.AppsDomain) {
		return invalid("%s is under the platform's apps domain", name)
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	d := &Domain{ID: newID(), ProjectID: p.ID, Name: name, CreatedAt: time.Now().UTC(), verificationToken: "zeitwork-verify=" + hex.EncodeToString(b[:])}
	_, err = o.pool.Exec(r.Context(), Q("DomainInsert"), d.ID, p.ID, who(r).OrgID, d.Name, d.verificationToken)
	if db.IsUniqueViolation(err) {
		return fmt.Errorf("%w: %s is already added to a project", errConflict, name)
	}
	if err != nil {
		return err
	}
	d.DNSRecords = o.records(d)
	writeJSON(w, 201, d)
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
	writeJSON(w, 200, map[string]any{"domains": out})
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
	return d, nil
}

func (o *Operator) getDomain(w http.ResponseWriter, r *http.Request) error {
	d, err := o.domain(r)
	if err != nil {
		return err
	}
	writeJSON(w, 200, d)
	return nil
}

func (o *Operator) verifyDomain(w http.ResponseWriter, r *http.Request) error {
	d, err := o.domain(r)
	if err != nil {
		return err
	}
	if err := o.checkDomain(r.Context(), d.ID, d.Name, d.verificationToken); err != nil {
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
	writeJSON(w, code, d)
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

// checkDomain looks the domain up in DNS and records the result. A domain
// is verified when it CNAMEs to the edge hostname, resolves only to edge
// addresses (EDGE_IPS), or carries the TXT token.
func (o *Operator) checkDomain(ctx context.Context, id uuid.UUID, name, token string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ok, reason := false, ""
	if txts, err := o.res.LookupTXT(ctx, "_zeitwork."+name); err == nil && slices.Contains(txts, token) {
		ok = true
	}
	if !ok {
		if cname, err := o.res.LookupCNAME(ctx, name); err == nil && strings.TrimSuffix(strings.ToLower(cname), ".") == o.cfg.EdgeHostname {
			ok = true
		} else if len(o.cfg.EdgeIPs) > 0 {
			ips, err := o.res.LookupHost(ctx, name)
			if err == nil && len(ips) > 0 && allIn(ips, o.cfg.EdgeIPs) {
				ok = true
			}
		}
	}
	if !ok {
		reason = fmt.Sprintf("no CNAME %s → %s and no TXT _zeitwork.%s with the verification token", name, o.cfg.EdgeHostname, name)
	}
	var was *time.Time
	err := o.tx(ctx, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `SELECT verified_at FROM domains WHERE id = $1 FOR UPDATE`, id).Scan(&was); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, Q("DomainSetVerified"), id, ok, reason); err != nil {
			return err
		}
		if (was != nil) != ok {
			_, err := tx.Exec(ctx, Q("BumpRoutes"))
			return err
		}
		return nil
	})
	return err
}

func allIn(ips, allowed []string) bool {
	for _, ip := range ips {
		if !slices.ContainsFunc(allowed, func(a string) bool { return net.ParseIP(a).Equal(net.ParseIP(ip)) }) {
			return false
		}
	}
	return true
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
	}
	ds, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (dom, error) {
		var d dom
		return d, row.Scan(&d.id, &d.name, &d.token)
	})
	if err != nil {
		return err
	}
	for _, d := range ds {
		if err := o.checkDomain(ctx, d.id, d.name, d.token); err != nil {
			return err
		}
	}
	return nil
}
