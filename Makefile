# blockmirror: `make demo` runs the main job on a built-in example, `make test` runs every check.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PKGS := qemu-utils qemu-system-common qemu-block-extra nbdkit libnbd-bin tmux openssl iproute2
PEER_TOOLS := qemu-img qemu-io qemu-nbd qemu-storage-daemon nbdkit nbdinfo nbdcopy tmux openssl ip

.PHONY: all demo test lint typecheck unit bench tools clean ceph-tools iotests bytecode

# Ceph for the rbd driver and its tests (tests/interop/test_rbd_*.py): a single-node cluster
# (scripts/ceph-cluster) and librbd's Python bindings, which Debian builds for its python3.
# The venv sees just those two modules through a .pth file naming a directory that holds
# links to them (not the whole of dist-packages).
CEPH_APT_PKGS := ceph-mon ceph-osd ceph-common python3-rbd python3-rados
CEPH_TOOLS := ceph-mon ceph-osd ceph rbd ceph-authtool monmaptool
CEPH_DIST := /usr/lib/python3/dist-packages
CEPH_BINDINGS := $(VENV)/ceph-bindings

all: test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Install the QEMU / NBD peers the interop tests compare against (Debian), when missing and root.
tools:
	@missing=""; for t in $(PEER_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing peer tools:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	  else echo "warning: missing peer tools:$$missing (interop tests will skip, or fail with CI=true)"; fi; \
	fi

# make tools installs the Ceph packages too (additive: its own prerequisite)
tools: ceph-tools

ceph-tools: $(STAMP)
	@missing=""; for t in $(CEPH_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	ls $(CEPH_DIST)/rbd.cpython-*.so $(CEPH_DIST)/rados.cpython-*.so >/dev/null 2>&1 || missing="$$missing python3-rbd"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing ceph:$$missing"; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CEPH_APT_PKGS) >/dev/null 2>&1 || \
	     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CEPH_APT_PKGS) >/dev/null)); \
	  else echo "warning: missing ceph tools:$$missing (rbd tests will skip, or fail with CI=true)"; fi; \
	fi
	@rm -rf $(CEPH_BINDINGS); mkdir -p $(CEPH_BINDINGS); \
	for m in rbd rados; do for f in $(CEPH_DIST)/$$m.cpython-*.so; do [ -e "$$f" ] && ln -sf "$$f" $(CEPH_BINDINGS)/; done; done; \
	site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	echo "$(abspath $(CEPH_BINDINGS))" > "$$site/blockmirror-ceph.pth"; \
	$(BIN)/python -c 'import rbd, rados' 2>/dev/null && echo "ceph bindings: importable from $(VENV)" || \
	  echo "warning: librbd Python bindings not importable from $(VENV)"

# Byte-compile the package: an editable install does not, and where PYTHONDONTWRITEBYTECODE
# is set every daemon start would compile ~150 modules again (0.3 s of CPU, measured).
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q src/blockmirror

demo: $(STAMP) tools bytecode
	$(BIN)/blockmirror demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks fuzz examples

typecheck: $(STAMP)
	$(BIN)/mypy src

unit: $(STAMP) bytecode
	$(BIN)/pytest -q tests/unit tests/property

test: $(STAMP) tools bytecode lint typecheck
	$(BIN)/pytest -q

bench: $(STAMP) tools bytecode
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# QEMU's own storage-daemon iotests (fetched from the installed QEMU's Debian source package into
# ~/.cache/blockmirror-iotests, run unmodified by their ./check -qcow2); not part of `make test`.
# IOTESTS="qsd-jobs" picks tests; QSD=qemu-storage-daemon runs them against the real daemon.
IOTESTS ?= qsd-jobs graph-changes-while-io 281 185
iotests: $(STAMP) tools bytecode
	@missing=""; command -v dpkg-source >/dev/null 2>&1 || missing="$$missing dpkg-dev"; \
	command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$$missing qemu-system-x86"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "warning: missing$$missing (tests that start a VM will fail)"; fi; \
	fi
	BLOCKMIRROR_PYTHON=$(abspath $(BIN))/python sh scripts/iotests/run.sh $(IOTESTS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# --- reliability (issue 15): fuzzing and soak --------------------------------------------
# make fuzz                       each harness for FUZZ_SECONDS (coverage-guided with atheris)
# make fuzz FUZZ_INPUTS=1000000   a million inputs per harness instead
# make fuzz FUZZ_HARNESSES=qmp    only some harnesses (keyval qmp nbd_server nbd_client qcow2)
# make fuzz FUZZ_JOBS=2           worker processes per harness (disjoint seeded streams)
# make fuzz FUZZ_ENGINE=random    the seeded random engine even where atheris is installed
FUZZ_SECONDS ?= 60
FUZZ_INPUTS ?= 0
FUZZ_SEED ?= 1
FUZZ_HARNESSES ?=
FUZZ_JOBS ?= 1
FUZZ_ENGINE ?= auto
.PHONY: fuzz soak
fuzz: $(STAMP) tools
	@$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/pip install -q -e '.[fuzz]' \
	  || echo "atheris is not installable here: the seeded random engine runs instead"
	$(BIN)/python -m fuzz.run --seed $(FUZZ_SEED) --jobs $(FUZZ_JOBS) --engine $(FUZZ_ENGINE) \
	  $(if $(filter-out 0,$(FUZZ_INPUTS)),--inputs $(FUZZ_INPUTS),--seconds $(FUZZ_SECONDS)) \
	  $(FUZZ_HARNESSES)

# make soak DURATION=3600: randomized mirrors, cancels, pauses and error policies with writers
DURATION ?= 600
SOAK_SEED ?= 1
soak: $(STAMP) tools
	$(BIN)/python -m tests.soak.run --duration $(DURATION) --seed $(SOAK_SEED)
