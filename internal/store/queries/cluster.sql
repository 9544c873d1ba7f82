-- name: RegionID
SELECT id FROM regions WHERE name = $1 AND deleted_at IS NULL;

-- name: RegionUpsert
INSERT INTO regions (id, name) VALUES ($1, $2)
ON CONFLICT (name) WHERE deleted_at IS NULL DO UPDATE SET name = excluded.name
RETURNING id;

-- name: NodeUpsert
INSERT INTO nodes (id, region_id, hostname, address, vcpus, memory_mib, disk_bytes, last_heartbeat_at, state, max_builds)
VALUES ($1, $2, $3, $4, $5, $6, $7, now(), 'ready', $8)
ON CONFLICT (id) DO UPDATE SET region_id = $2, hostname = $3, address = $4, vcpus = $5, memory_mib = $6,
    disk_bytes = $7, max_builds = $8, last_heartbeat_at = now(), updated_at = now(),
    state = CASE WHEN nodes.state = 'down' THEN 'ready' ELSE nodes.state END
RETURNING (xmax = 0);

-- name: InstanceReport
UPDATE instances SET state = $2, healthy = $3, ip = $4, restarts = $5, error = $6, updated_at = now()
WHERE id = $1 AND node_id = $7 AND deleted_at IS NULL
  AND (state, healthy, ip, restarts, error) IS DISTINCT FROM ($2, $3, $4, $5, $6)
RETURNING deployment_id;

-- name: EdgeUpsert
INSERT INTO edges (id, region_id, https_address, http_address, last_seen_at) VALUES ($1, $2, $3, $4, now())
ON CONFLICT (id) DO UPDATE SET region_id = $2, https_address = $3, http_address = $4, last_seen_at = now();

-- name: EdgesList
SELECT e.id, r.name, e.https_address, e.http_address FROM edges e JOIN regions r ON r.id = e.region_id
WHERE ($1 = '' OR r.name = $1) AND e.last_seen_at > now() - $2::interval ORDER BY e.id;

-- name: NodesMarkDown
UPDATE nodes SET state = 'down', updated_at = now()
WHERE state <> 'down' AND deleted_at IS NULL AND last_heartbeat_at < now() - $1::interval
RETURNING id;

-- name: OpenDeployments
SELECT d.id, d.status, d.image_ref, d.preview, d.deadline_at < now(), p.id, p.name, o.name, p.port, p.health_path,
       p.min_instances_per_region, p.vcpus, p.memory_mib, p.active_deployment_id IS NOT DISTINCT FROM d.id,
       coalesce(i.digest, ''), d.finished_at, d.branch,
       EXISTS (SELECT 1 FROM builds b WHERE b.deployment_id = d.id)
FROM deployments d JOIN projects p ON p.id = d.project_id JOIN organisations o ON o.id = d.organisation_id
LEFT JOIN images i ON i.id = d.image_id
WHERE d.deleted_at IS NULL AND p.deleted_at IS NULL
  AND (d.status IN ('pending', 'preparing', 'starting', 'healthy', 'active')
       OR (d.status = 'superseded' AND EXISTS (SELECT 1 FROM instances x WHERE x.deployment_id = d.id
                                               AND x.deleted_at IS NULL AND x.desired_state = 'running')))
ORDER BY d.created_at;

-- name: ImageUpsert
INSERT INTO images (id, reference, digest, size_bytes, config) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (reference, digest) DO UPDATE SET size_bytes = excluded.size_bytes
RETURNING id;

-- name: DeploymentSetImage
UPDATE deployments SET image_id = $2, updated_at = now() WHERE id = $1;

-- name: ReadyNodes
-- The nodes new instances may go to: ready, and heard from within $1 (half
-- of NODE_DOWN_AFTER): a node gone silent, not yet marked down, gets
-- nothing new.
SELECT n.id, r.id, r.name, n.address, n.vcpus, n.memory_mib,
       coalesce((SELECT sum(i.vcpus) FROM instances i WHERE i.node_id = n.id AND i.deleted_at IS NULL AND i.desired_state = 'running'), 0),
       coalesce((SELECT sum(i.memory_mib) FROM instances i WHERE i.node_id = n.id AND i.deleted_at IS NULL AND i.desired_state = 'running'), 0)
FROM nodes n JOIN regions r ON r.id = n.region_id
WHERE n.deleted_at IS NULL AND n.state = 'ready' AND n.last_heartbeat_at > now() - $1::interval ORDER BY r.name, n.id;

-- name: AllRegions
SELECT DISTINCT r.id, r.name FROM regions r JOIN nodes n ON n.region_id = r.id
WHERE r.deleted_at IS NULL AND n.deleted_at IS NULL ORDER BY r.name;

-- name: InstanceInsert
-- Only while the deployment and its project are open and the node is ready.
-- Their rows are locked (FOR SHARE): an insert racing a stop (the
-- deployment stopped, its project deleted) or a drain either commits
-- first, and the stop's UPDATE then sees and stops the new instance too
-- (a drain moves it), or waits for it and inserts nothing.
INSERT INTO instances (id, deployment_id, node_id, region_id, vcpus, memory_mib)
SELECT $1::uuid, d.id, n.id, $4::uuid, $5::int, $6::int
FROM deployments d JOIN projects p ON p.id = d.project_id, nodes n
WHERE d.id = $2 AND d.status NOT IN ('failed', 'stopped') AND d.deleted_at IS NULL AND p.deleted_at IS NULL
  AND n.id = $3 AND n.state = 'ready' AND n.deleted_at IS NULL
FOR SHARE OF d, p, n;

-- name: InstanceSetDesired
UPDATE instances SET desired_state = $2, updated_at = now() WHERE id = $1;

-- name: InstanceDelete
UPDATE instances SET deleted_at = now(), updated_at = now() WHERE id = $1;

-- name: InstancesToStop
SELECT i.id, n.address FROM instances i JOIN nodes n ON n.id = i.node_id
WHERE i.deleted_at IS NULL AND i.desired_state = 'stopped' AND n.state <> 'down';

-- name: DeploymentSupersede
UPDATE deployments SET status = 'superseded', finished_at = now(), updated_at = now()
WHERE project_id = $1 AND id <> $2 AND status IN ('active', 'healthy') AND NOT preview;

-- name: SupersededExpired
SELECT d.id FROM deployments d JOIN projects p ON p.id = d.project_id
WHERE d.status = 'superseded' AND d.finished_at < now() - $1::interval
  AND p.active_deployment_id IS DISTINCT FROM d.id
  AND EXISTS (SELECT 1 FROM instances i WHERE i.deployment_id = d.id AND i.deleted_at IS NULL AND i.desired_state = 'running');

-- name: StopDeploymentInstances
UPDATE instances SET desired_state = 'stopped', updated_at = now() WHERE deployment_id = $1 AND deleted_at IS NULL;

-- name: BumpRoutes
SELECT bump_route_version();

-- name: RoutesVersion
SELECT version FROM route_table_version;

-- name: RouteDeployments
SELECT d.id, d.hostname, p.id, p.name, o.name, p.active_deployment_id IS NOT DISTINCT FROM d.id
FROM deployments d JOIN projects p ON p.id = d.project_id JOIN organisations o ON o.id = d.organisation_id
WHERE d.deleted_at IS NULL AND p.deleted_at IS NULL AND o.deleted_at IS NULL
  AND d.status IN ('starting', 'healthy', 'active', 'superseded');

-- name: RouteInstances
SELECT i.id, i.deployment_id, n.id, n.address, r.name, i.healthy AND i.state = 'running' AND n.state <> 'down'
FROM instances i JOIN nodes n ON n.id = i.node_id JOIN regions r ON r.id = i.region_id
WHERE i.deleted_at IS NULL AND i.desired_state = 'running';

-- name: RouteDomains
SELECT dm.name, p.active_deployment_id, p.id
FROM domains dm JOIN projects p ON p.id = dm.project_id
WHERE dm.deleted_at IS NULL AND dm.verified_at IS NOT NULL AND p.deleted_at IS NULL AND p.active_deployment_id IS NOT NULL;

-- name: WebhookDeliveryInsert
INSERT INTO webhook_deliveries (delivery_id, event) VALUES ($1, $2) ON CONFLICT DO NOTHING;

-- name: WebhookDeliveryUpdate
UPDATE webhook_deliveries SET status = $2, project_id = $3, deployment_id = $4 WHERE delivery_id = $1;

-- name: ProjectsByRepo
SELECT p.id, p.organisation_id, p.name, p.github_branch, p.image_template, o.name, p.github_repo, p.git_url
FROM projects p JOIN organisations o ON o.id = p.organisation_id
WHERE lower(p.github_repo) = lower($1) AND p.deleted_at IS NULL AND o.deleted_at IS NULL
ORDER BY p.id;

-- name: PreviousHealthy
SELECT d.id FROM deployments d
WHERE d.project_id = $1 AND d.id IS DISTINCT FROM $2 AND NOT d.preview AND d.healthy_at IS NOT NULL
  AND d.status IN ('superseded', 'healthy', 'active') AND d.deleted_at IS NULL
ORDER BY d.healthy_at DESC LIMIT 1;

-- name: InstancesOfDownNodesStop
-- Instances on down nodes stop counting (replacements are placed); they are
-- deleted from the node if it ever comes back.
UPDATE instances i SET desired_state = 'stopped', healthy = false, updated_at = now()
FROM nodes n
WHERE n.id = i.node_id AND n.state = 'down' AND i.deleted_at IS NULL AND i.desired_state = 'running';

-- name: InstancesOfLostNodesForget
-- A node down for a day is not coming back with its VMs.
UPDATE instances i SET deleted_at = now(), updated_at = now()
FROM nodes n
WHERE n.id = i.node_id AND n.state = 'down' AND i.deleted_at IS NULL AND n.last_heartbeat_at < now() - interval '24 hours';

-- name: InstancesOfClosedDeploymentsStop
-- Failed and stopped deployments, and those of deleted projects, run
-- nothing: whatever path left an instance of one running, the next pass
-- stops it.
UPDATE instances i SET desired_state = 'stopped', updated_at = now()
FROM deployments d JOIN projects p ON p.id = d.project_id
WHERE d.id = i.deployment_id AND i.deleted_at IS NULL AND i.desired_state = 'running'
  AND (d.status IN ('failed', 'stopped') OR d.deleted_at IS NOT NULL OR p.deleted_at IS NOT NULL);

-- name: InstancesFailedStop
UPDATE instances SET desired_state = 'stopped', updated_at = now()
WHERE state = 'failed' AND desired_state = 'running' AND deleted_at IS NULL;

-- name: InstancesLostByNode
-- Instances the node reported before but no longer does were lost (e.g. the
-- agent's state was wiped): back to pending, so they are created again.
UPDATE instances SET state = 'pending', healthy = false, error = 'lost by its node; recreating', updated_at = now()
WHERE node_id = $1 AND deleted_at IS NULL AND desired_state = 'running' AND state <> 'pending'
  AND NOT (id = ANY($2::uuid[]));

-- name: InstancesKnownOnNode
SELECT id FROM instances WHERE node_id = $1 AND deleted_at IS NULL AND id = ANY($2::uuid[]);

-- name: ReadyNodeAddresses
SELECT id, address FROM nodes WHERE deleted_at IS NULL AND state IN ('ready', 'draining');

-- name: ShouldPromote
-- A healthy deployment goes live when asked to (promote, rollback), when
-- nothing is live, or when it is newer than what is live.
SELECT d.promote_requested OR p.active_deployment_id IS NULL
       OR (SELECT a.created_at FROM deployments a WHERE a.id = p.active_deployment_id) < d.created_at
FROM deployments d JOIN projects p ON p.id = d.project_id WHERE d.id = $1;

-- name: ProjectLock
SELECT 1 FROM projects WHERE id = $1 FOR UPDATE;

-- name: ProjectSetActive
UPDATE projects SET active_deployment_id = $2, updated_at = now() WHERE id = $1;

-- name: PromoteRequestClear
UPDATE deployments SET promote_requested = false WHERE id = $1 AND promote_requested;

-- name: PreviewsSupersede
-- A healthy preview replaces the older previews of its branch; they keep
-- their URL for the retention window.
UPDATE deployments SET status = 'superseded', finished_at = now(), updated_at = now()
WHERE project_id = $1 AND branch = $2 AND preview AND id <> $3 AND status = 'healthy'
  AND created_at < (SELECT created_at FROM deployments WHERE id = $3);

-- name: DeploymentRestart
-- Promote or rollback to a deployment whose VMs are gone: it starts again
-- under a fresh deadline and goes live once healthy.
UPDATE deployments SET status = 'starting', starting_at = now(), healthy_at = NULL, finished_at = NULL,
       deadline_at = now() + $2::interval, failure_reason = '', promote_requested = true, updated_at = now()
WHERE id = $1;

-- name: RegionsWithNodesCount
SELECT count(DISTINCT n.region_id) FROM nodes n JOIN regions r ON r.id = n.region_id
WHERE n.deleted_at IS NULL AND r.deleted_at IS NULL;
