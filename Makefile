# Zeitwork — thin aliases. `make dev` runs the platform on this machine;
# `make test` runs every test. Both install what is missing first.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X github.com/zeitwork/zeitwork/internal/buildinfo.Version=$(VERSION) -X github.com/zeitwork/zeitwork/internal/buildinfo.Commit=$(COMMIT)
BINARIES := zeitwork-operator zeitwork-node-agent zeitwork-load-balancer zeitwork-edge-proxy zeitwork-dns zeitwork zeitwork-init
PREFIX ?= /usr/local
TEST_TIMEOUT ?= 45m

# Debian packages the platform, its tests and its benchmarks need.
APT_PACKAGES := postgresql qemu-system-x86 qemu-utils e2fsprogs iproute2 nftables cpio lz4 kmod \
	haproxy nginx-light wrk nghttp2-client caddy ca-certificates curl git make gcc \
	buildah docker-registry busybox-static prometheus chromium unbound

.PHONY: all deps build test test-go lint dev topology observe install bench bench-lb bench-edge bench-vm bench-build bench-topology clean

all: build

# prometheus is installed for its binaries (promtool and prometheus: the
# observability tests, make observe), unbound for the GeoDNS resolver test
# (it would hold :53, which zeitwork-dns serves). Where systemd runs, the
# services their packages enable and start are turned off again; without
# systemd (CI, the development machines) their postinst starts nothing.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing && \
		if [[ " $$missing " == *" prometheus "* && -d /run/systemd/system ]]; then \
			$$SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true; \
		fi; \
		if [[ " $$missing " == *" unbound "* && -d /run/systemd/system ]]; then \
			$$SUDO systemctl disable --now unbound.service >/dev/null 2>&1 || true; \
		fi; \
	fi
	$(GO) mod download

build:
	@mkdir -p bin
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ ./cmd/zeitwork-operator ./cmd/zeitwork-node-agent ./cmd/zeitwork-load-balancer ./cmd/zeitwork-edge-proxy ./cmd/zeitwork-dns ./cmd/zeitwork
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/zeitwork-init ./cmd/zeitwork-init
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o bin/examples/hello ./examples/hello

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

# e2e/topology (27 namespace hosts, nine operators, 18 microVMs) runs
# after the rest, alone: beside the e2e suite's microVMs a 2-core machine
# misses its heartbeat and leader-lock deadlines.
test-go:
	ZEITWORK_BIN_DIR=$(CURDIR)/bin $(GO) test -count=1 -timeout $(TEST_TIMEOUT) $$($(GO) list ./... | grep -v '/e2e/topology$$')
	ZEITWORK_BIN_DIR=$(CURDIR)/bin $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./e2e/topology/

test: deps build lint test-go

dev: deps build
	./bin/zeitwork dev

# The production layout (3 regions × (3 operators + 6 workers), GeoDNS,
# PostgreSQL) as network namespaces zwt-* on this machine; needs root.
topology: deps build
	$(GO) run ./cmd/zeitwork-topology --bin bin --state .dev/topology

# Prometheus (Debian's binary) with deployments/observability against the
# `make dev` platform (run it in a second terminal); data in .dev/prometheus.
OBSERVE_ADDR ?= 127.0.0.1:9090
observe: deps
	@echo "==> Prometheus on http://$(OBSERVE_ADDR) (targets: deployments/observability/targets; docs/operations.md)"
	prometheus --config.file=deployments/observability/prometheus.yml --storage.tsdb.path=.dev/prometheus \
		--web.listen-address=$(OBSERVE_ADDR) --web.enable-lifecycle --log.level=warn

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)/etc/zeitwork $(DESTDIR)/etc/systemd/system
	for b in $(BINARIES); do install -m 0755 bin/$$b $(DESTDIR)$(PREFIX)/bin/$$b; done
	for f in deployments/systemd/*.service; do install -m 0644 $$f $(DESTDIR)/etc/systemd/system/; done
	for f in deployments/config/*.env; do t=$(DESTDIR)/etc/zeitwork/$$(basename $$f); [ -e $$t ] || install -m 0600 $$f $$t; done
	-systemctl daemon-reload 2>/dev/null

bench: bench-lb bench-edge bench-vm bench-build

bench-lb: deps build
	taskset -c 0 $(GO) run ./bench/lb

bench-edge: deps build
	taskset -c 0 $(GO) run ./bench/edge

bench-vm: deps build
	$(GO) run ./bench/vm

bench-build: deps build
	$(GO) run ./bench/build

bench-topology: deps build
	$(GO) run ./bench/topology --bin bin

clean:
	rm -rf bin
