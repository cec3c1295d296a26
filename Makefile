# quic-report: make deps | demo | test | bench
#
# quiche builds BoringSSL, which needs cmake and libclang: `deps` installs
# them with apt-get when they are missing (as root, or through sudo), and
# every other target depends on it. The interop tests (bin/tests/interop.rs)
# need python3 with venv too: they pip-install aioquic into target/interop-venv.
# The database tests start private PostgreSQL clusters from postgresql's
# binaries. The network tests (bin/tests/netns.rs) make network namespaces of
# their own, which needs root.

CARGO ?= cargo
SHELL := /bin/bash

.PHONY: deps demo test bench build fmt clean

# What quiche's build and the tests need, asked of dpkg by package name (a
# file glob would take the image's libclang-cpp14 for the libclang-dev that
# bindgen loads). PostgreSQL's server is for the database tests and the bench;
# iproute2's ip(8) and util-linux's unshare(1) and nsenter(1) set up the
# network namespaces of bin/tests/netns.rs; curl reads the servers'
# /metrics in `make bench`.
DEPS_PKGS := cmake libclang-dev build-essential python3-venv postgresql sqlite3 iproute2 util-linux curl

deps:
	@missing=""; \
	for p in $(DEPS_PKGS); do \
	  dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed$$' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  if [ -n "$$sudo" ] && ! command -v sudo >/dev/null; then \
	    echo "make deps: not root and no sudo: install$$missing first" >&2; exit 1; \
	  fi; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: deps
	$(CARGO) build --workspace

# The whole system on loopback: source + server + client, labelled output.
# Ctrl-C stops it. DEMO_ARGS="--count 5" stops after five reports.
demo: deps
	$(CARGO) run -q -p quic-report -- demo $(DEMO_ARGS)

# Every test, plus the lints CI holds us to.
# The tests' sources and servers are on loopback: a proxy set in the
# environment (for the package registries, say) must not carry them. The
# proxy tests (bin/tests/proxy.rs) set their own proxy variables.
test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	NO_PROXY="127.0.0.1,localhost,::1$${NO_PROXY:+,$$NO_PROXY}" no_proxy="127.0.0.1,localhost,::1$${no_proxy:+,$$no_proxy}" $(CARGO) test --workspace
	$(CARGO) run -q -p quic-report-core --example embed

# Figures on loopback as one table (about 3 minutes; README "Benchmarks").
# It reports and never fails on a figure. `scripts/bench.sh profile` runs the
# server under callgrind instead.
# The database rows run against a private PostgreSQL cluster (pg-cluster
# starts it, runs the script, and stops it whatever happens).
bench: deps
	$(CARGO) build --release -p quic-report -p quic-report-bench -p quic-report-pg-cluster
	$${CARGO_TARGET_DIR:-target}/release/pg-cluster scripts/bench.sh

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
