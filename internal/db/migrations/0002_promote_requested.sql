-- An explicit promote or rollback to a deployment that must first be
-- restarted: the reconciler promotes it once healthy even though it is
-- older than the active one.
ALTER TABLE deployments ADD COLUMN promote_requested boolean NOT NULL DEFAULT false;
