package operator

import (
	"context"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/zeitwork/zeitwork/internal/db"
)

type pgxpoolPool = pgxpool.Pool

func openPool(ctx context.Context, url string) (*pgxpool.Pool, error) { return db.Open(ctx, url) }
