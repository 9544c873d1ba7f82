// Package upgrade tests the rolling upgrade runbook of docs/operations.md
// end to end: a real platform (internal/devcluster) serving a microVM app
// through load balancer → edge proxy → node agent, every service upgraded
// to a newer build one at a time under constant load.
package upgrade
