package store

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Querier is what a pool and a transaction have in common.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

var (
	_ Querier = (*pgxpool.Pool)(nil)
	_ Querier = pgx.Tx(nil)
)

// Interval renders d for a "$n::interval" parameter.
func Interval(d time.Duration) string { return fmt.Sprintf("%d milliseconds", d.Milliseconds()) }

// SetStatus moves a deployment to status (with its phase timestamp and, for
// failed, the reason) in one transaction; failed and stopped deployments'
// instances are told to stop; routes are bumped.
func SetStatus(ctx context.Context, pool *pgxpool.Pool, id uuid.UUID, status, reason string) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, Q("DeploymentSetStatus"), id, status, reason); err != nil {
			return err
		}
		if status == "failed" || status == "stopped" {
			if _, err := tx.Exec(ctx, Q("StopDeploymentInstances"), id); err != nil {
				return err
			}
		}
		_, err := tx.Exec(ctx, Q("BumpRoutes"))
		return err
	})
}

// Promote points the project's production alias (and so its verified
// custom domains) at the deployment, supersedes the previous live one and
// bumps the route table, in one transaction under the project's row lock.
func Promote(ctx context.Context, pool *pgxpool.Pool, projectID, deploymentID uuid.UUID) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		for _, q := range []struct {
			name string
			args []any
		}{
			{"ProjectLock", []any{projectID}},
			{"DeploymentSupersede", []any{projectID, deploymentID}},
			{"ProjectSetActive", []any{projectID, deploymentID}},
			{"DeploymentSetStatus", []any{deploymentID, "active", ""}},
			{"PromoteRequestClear", []any{deploymentID}},
			{"BumpRoutes", nil},
		} {
			if _, err := tx.Exec(ctx, Q(q.name), q.args...); err != nil {
				return fmt.Errorf("%s: %w", q.name, err)
			}
		}
		return nil
	})
}

// Instance is an instance row with its region and node.
type Instance struct {
	ID           uuid.UUID
	DeploymentID uuid.UUID
	NodeID       uuid.UUID
	Region       string
	State        string
	Healthy      bool
	Desired      string
	Error        string
	Restarts     int
	NodeAddress  string
	NodeState    string
}

// InstancesOf lists a deployment's live instance rows.
func InstancesOf(ctx context.Context, q Querier, deploymentID uuid.UUID) ([]Instance, error) {
	rows, err := q.Query(ctx, Q("InstancesOfDeployment"), deploymentID)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (Instance, error) {
		in := Instance{DeploymentID: deploymentID}
		err := row.Scan(&in.ID, &in.NodeID, &in.Region, &in.State, &in.Healthy, &in.Desired, &in.Error, &in.Restarts, &in.NodeAddress, &in.NodeState)
		return in, err
	})
}
