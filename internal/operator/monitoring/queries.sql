-- Queries of the operator's monitoring (internal/operator/monitoring):
-- read-only, aggregated, cheap enough to run on every scrape.

-- name: MonNodes
SELECT n.id::text, n.hostname, r.name, n.state, n.address,
       extract(epoch FROM now() - n.last_heartbeat_at)::float8,
       n.vcpus, n.memory_mib::bigint * 1048576,
       coalesce((SELECT sum(i.vcpus) FROM instances i WHERE i.node_id = n.id AND i.deleted_at IS NULL AND i.desired_state = 'running'), 0)::bigint,
       coalesce((SELECT sum(i.memory_mib) FROM instances i WHERE i.node_id = n.id AND i.deleted_at IS NULL AND i.desired_state = 'running'), 0)::bigint * 1048576
FROM nodes n JOIN regions r ON r.id = n.region_id
WHERE n.deleted_at IS NULL AND r.deleted_at IS NULL
ORDER BY r.name, n.hostname, n.id;

-- name: MonInstances
SELECT r.name, i.state, (i.state = 'running' AND i.healthy), count(*)
FROM instances i JOIN regions r ON r.id = i.region_id
WHERE i.deleted_at IS NULL AND i.desired_state = 'running'
GROUP BY 1, 2, 3;

-- name: MonDeployments
-- Live deployments: being rolled out, serving, or superseded with
-- instances still running (the retention window).
SELECT d.id::text, o.name, p.name, d.status, p.min_instances_per_region
FROM deployments d JOIN projects p ON p.id = d.project_id JOIN organisations o ON o.id = d.organisation_id
WHERE d.deleted_at IS NULL AND p.deleted_at IS NULL
  AND (d.status IN ('pending', 'building', 'preparing', 'starting', 'healthy', 'active')
       OR (d.status = 'superseded' AND EXISTS (SELECT 1 FROM instances x WHERE x.deployment_id = d.id
                                               AND x.deleted_at IS NULL AND x.desired_state = 'running')));

-- name: MonDeploymentInstances
SELECT i.deployment_id::text, r.name,
       count(*) FILTER (WHERE i.state = 'running' AND i.healthy),
       count(*) FILTER (WHERE NOT (i.state = 'running' AND i.healthy)),
       coalesce(sum(i.restarts), 0)::bigint
FROM instances i JOIN regions r ON r.id = i.region_id JOIN deployments d ON d.id = i.deployment_id
WHERE i.deleted_at IS NULL AND i.desired_state = 'running' AND d.deleted_at IS NULL
  AND d.status IN ('pending', 'building', 'preparing', 'starting', 'healthy', 'active', 'superseded')
GROUP BY 1, 2;

-- name: MonRegions
-- Regions a deployment is placed in: those with at least one node.
SELECT r.name FROM regions r
WHERE r.deleted_at IS NULL AND EXISTS (SELECT 1 FROM nodes n WHERE n.region_id = r.id AND n.deleted_at IS NULL)
ORDER BY r.name;

-- name: MonRecovery
SELECT pg_is_in_recovery();

-- name: MonStandbyLag
-- On a standby: how far replay is behind. Caught up (everything received
-- is replayed) is a lag of 0; nothing replayed yet is unknown (NULL).
SELECT CASE WHEN pg_last_wal_receive_lsn() IS NOT NULL AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END::float8;

-- name: MonPrimaryLag
-- On a primary: its streaming standbys. replay_lsn is NULL for a role
-- without pg_read_all_stats (pg_monitor): the lag is unknown then, not 0.
SELECT count(*),
       count(*) FILTER (WHERE replay_lsn IS NULL),
       max(CASE WHEN replay_lsn >= pg_current_wal_lsn() THEN 0 ELSE extract(epoch FROM replay_lag) END)::float8,
       count(*) FILTER (WHERE replay_lsn < pg_current_wal_lsn() AND replay_lag IS NULL),
       max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::float8
FROM pg_stat_replication;
