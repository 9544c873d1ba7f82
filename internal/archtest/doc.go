// Package archtest holds tests that enforce the repository's architecture:
// every package is documented, and the user CLI links no server code.
package archtest
