// Package observability holds what Zeitwork's monitoring and operations
// kit (deployments/observability, docs/operations.md) is checked with:
// the Prometheus and promtool binaries from Debian's prometheus package,
// the list of metric families every service must export, the dashboards'
// PromQL, and PostgreSQL tooling for the backup and restore runbooks.
//
// Its tests start the platform (internal/devcluster), scrape every
// binary, lint each scrape with `promtool check metrics`, run the alert
// rules' unit tests and every dashboard query against a real Prometheus.
package observability
