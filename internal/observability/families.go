package observability

// Families lists, per scrape job, the metric families a running service
// must export: the production guide's monitoring list mapped to metrics
// (docs/operations.md, "What is measured"). A job's scrape that lacks one
// fails the platform test. Histograms are named by their family
// (…_seconds, exported as _bucket, _sum, _count).
var Families = map[string][]string{
	"zeitwork-operator": {
		// service status
		"zeitwork_operator_build_info",
		"process_start_time_seconds",
		// API response times, errors
		"zeitwork_operator_api_request_duration_seconds",
		"zeitwork_operator_api_requests_total",
		// deployment success rate, build times
		"zeitwork_operator_deployments_total",
		"zeitwork_build_duration_seconds",
		"zeitwork_builds_total",
		"zeitwork_operator_leader",
		"zeitwork_operator_leader_pauses_total",
		"zeitwork_operator_reconcile_duration_seconds",
		// database
		"zeitwork_db_up",
		"zeitwork_db_ping_duration_seconds",
		"zeitwork_db_pool_connections",
		"zeitwork_db_in_recovery",
		"zeitwork_db_replication_lag_known",
		// node availability (the leader reports the cluster's state)
		"zeitwork_cluster_nodes",
		"zeitwork_cluster_node_state",
		"zeitwork_cluster_node_heartbeat_age_seconds",
		"zeitwork_cluster_capacity_vcpus",
		"zeitwork_cluster_allocated_vcpus",
		// customer application health, active VMs per deployment
		"zeitwork_cluster_instances",
		"zeitwork_deployment_info",
		"zeitwork_deployment_instances",
		"zeitwork_deployment_min_instances",
		"zeitwork_deployment_instance_restarts",
	},
	"zeitwork-node-agent": {
		"zeitwork_node_agent_build_info",
		"zeitwork_node_agent_instances",
		// VM boot times
		"zeitwork_node_agent_boot_seconds",
		// CPU, memory, disk, network per node
		"zeitwork_node_cpus",
		"zeitwork_node_cpu_seconds_total",
		"zeitwork_node_memory_total_bytes",
		"zeitwork_node_memory_available_bytes",
		"zeitwork_node_filesystem_size_bytes",
		"zeitwork_node_filesystem_avail_bytes",
		"zeitwork_node_disk_read_bytes_total",
		"zeitwork_node_disk_written_bytes_total",
		"zeitwork_node_disk_io_time_seconds_total",
		"zeitwork_node_network_receive_bytes_total",
		"zeitwork_node_network_transmit_bytes_total",
	},
	"zeitwork-dataplane": {
		"zeitwork_dataplane_build_info",
		"zeitwork_dataplane_routes",
	},
	"zeitwork-edge-proxy": {
		"zeitwork_edge_proxy_build_info",
		// request latency and error rates
		"zeitwork_edge_proxy_request_duration_seconds",
		"zeitwork_edge_proxy_requests_total",
		"zeitwork_edge_proxy_upstream_errors_total",
		"zeitwork_edge_proxy_rate_limited_total",
		// certificates
		"zeitwork_edge_proxy_certificate_expiry_seconds",
		"zeitwork_edge_proxy_acme_certificates_total",
		"zeitwork_edge_proxy_route_table_staleness_seconds",
	},
	"zeitwork-load-balancer": {
		"zeitwork_load_balancer_build_info",
		"zeitwork_load_balancer_connections_accepted_total",
		"zeitwork_load_balancer_connections_active",
		"zeitwork_load_balancer_backend_up",
		"zeitwork_load_balancer_errors_total",
		"zeitwork_load_balancer_bytes_total",
	},
}
