package nodeagent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/zeitwork/zeitwork/internal/envconfig"
	"github.com/zeitwork/zeitwork/internal/vmm/firecracker"
)

// TestFirecrackerBackendConfig: VMM=firecracker is accepted, newVMM
// builds the backend (with the jailer when JAILER_BIN is set) and a
// missing binary is a clear error at start.
func TestFirecrackerBackendConfig(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "firecracker")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	l := envconfig.FromMap(map[string]string{"VMM": "firecracker", "FIRECRACKER_BIN": bin, "JAILER_BIN": bin,
		"JAILER_UID": "123", "JAILER_GID": "456", "ENVIRONMENT": "development"})
	cfg := LoadConfig(l)
	if err := l.Err(); err != nil {
		t.Fatal(err)
	}
	if cfg.JailerUID != 123 || cfg.JailerGID != 456 || cfg.JailerChroot != "/srv/jailer" {
		t.Fatalf("jailer config %+v", cfg)
	}
	v, err := newVMM(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := v.(*firecracker.Firecracker); !ok || v.Name() != "firecracker" || accelerator(v) != "kvm" {
		t.Fatalf("newVMM = %T %s", v, v.Name())
	}

	cfg.FirecrackerBin = filepath.Join(t.TempDir(), "missing")
	if v, err := newVMM(cfg); err == nil || v != nil || !strings.Contains(err.Error(), "FIRECRACKER_BIN") {
		t.Fatalf("newVMM with a missing binary = %v, %v", v, err)
	}

	l = envconfig.FromMap(map[string]string{"VMM": "qemu", "JAILER_BIN": bin, "ENVIRONMENT": "development"})
	LoadConfig(l)
	if err := l.Err(); err == nil || !strings.Contains(err.Error(), "JAILER_BIN") {
		t.Fatalf("JAILER_BIN with VMM=qemu: %v", err)
	}
}
