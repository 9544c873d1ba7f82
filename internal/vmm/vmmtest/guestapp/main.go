// Command guestapp is the app the VMM contract suite (package vmmtest) runs
// inside a real guest: it prints one line naming the token from its
// environment and its user, and on SIGTERM prints another and keeps
// running, so the suite can exchange frames with a re-adopted machine and
// still find it running for Kill.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	token := os.Getenv("VMMTEST_TOKEN")
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	fmt.Printf("vmmtest-app %s started uid=%d\n", token, os.Getuid())
	for range term {
		fmt.Printf("vmmtest-app %s got SIGTERM\n", token)
	}
}
