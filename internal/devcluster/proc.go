package devcluster

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Proc is one platform process run by the cluster: a real binary with its
// own environment and log file.
type Proc struct {
	Name    string
	Path    string
	Args    []string
	Env     map[string]string
	LogFile string
	// Health is polled after start until it answers 200.
	Health string
	// KeepGroup leaves children (microVMs) running when the process is killed.
	KeepGroup bool

	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Start launches the process and, when Health is set, waits until it
// answers.
func (p *Proc) Start(ctx context.Context, timeout time.Duration) error {
	if err := os.MkdirAll(filepath.Dir(p.LogFile), 0o755); err != nil {
		return err
	}
	logf, err := os.OpenFile(p.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.Path, p.Args...)
	env := os.Environ()
	for k, v := range p.Env {
		env = append(env, k+"="+v)
	}
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	// Setpgid: Kill can take the whole group; Pdeathsig: nothing outlives
	// the cluster's owner (microVMs and node agents' data planes have their
	// own sessions and are handled by StopVMs).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("cannot start %s: %w", p.Name, err)
	}
	p.cmd, p.done, p.err = cmd, make(chan struct{}), nil
	go func() { // owned by p: ends when the process exits
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	if p.Health == "" {
		return nil
	}
	deadline := time.Now().Add(timeout)
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := client.Get(p.Health)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited during start-up (%v); last log lines:\n%s", p.Name, p.err, tail(p.LogFile, 15))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not healthy at %s after %s; last log lines:\n%s", p.Name, p.Health, timeout, tail(p.LogFile, 15))
		}
	}
}

// Running reports whether the process is alive.
func (p *Proc) Running() bool {
	if p.done == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Stop sends SIGTERM and waits up to timeout, then kills.
func (p *Proc) Stop(timeout time.Duration) error {
	if !p.Running() {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		var ee *exec.ExitError
		if errors.As(p.err, &ee) {
			return fmt.Errorf("%s exited with %v after SIGTERM", p.Name, ee)
		}
		return nil
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("%s did not stop within %s after SIGTERM", p.Name, timeout)
	}
}

// Kill sends SIGKILL to the process (and its group unless KeepGroup).
func (p *Proc) Kill() {
	if !p.Running() {
		return
	}
	if p.KeepGroup {
		_ = p.cmd.Process.Kill()
	} else {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	}
	<-p.done
}

// Signal sends sig to the process (not its group); it does nothing when
// the process is not running.
func (p *Proc) Signal(sig os.Signal) error {
	if !p.Running() {
		return nil
	}
	return p.cmd.Process.Signal(sig)
}

// Done is closed when the process exits.
func (p *Proc) Done() <-chan struct{} { return p.done }

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
