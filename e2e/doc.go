// Package e2e holds Zeitwork's end-to-end suite: the real binaries as
// separate processes (PostgreSQL, operator, node agents booting real
// microVMs, edge proxies, load balancers) driven through the CLI and
// reached through the load balancer, as a user would.
package e2e
