# The two commands: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The benchmarks' peers get venvs of their own (see their targets below); defined here, before
# `test` names them as prerequisites (make expands a rule's prerequisites when it reads it).
PEER := benchmarks/.venv-peer
DRIFT_PEER := benchmarks/.venv-drift-peer
# The stamp changes whenever pyproject.toml does, so a dependency change reinstalls.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup services bench-tools run test lint format bench bench-validation bench-training \
	bench-features clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	# torch first and pinned: the CPU wheel on disk, never a multi-GB CUDA build
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: setup
	$(BIN)/loopline run

# Everything but the soaks (their own targets below); the slowest tests are listed at the end.
# It runs every benchmark at its smoke size too (tests/benchmarks), hence wrk and the peers'
# venvs (the serving benchmark's feast serve + FastAPI, the drift benchmark's Evidently). On a
# fresh machine the installs run side by side (test-deps, -j3): Debian's packages in one
# apt-get, the drift peer's venv beside the product's, the serving peer's after it.
test:
	@$(MAKE) --no-print-directory -j3 --output-sync=target test-deps
	$(BIN)/pytest -m "not soak" --durations=15

.PHONY: test-deps system-packages
test-deps: lint system-packages $(PEER)/.installed $(DRIFT_PEER)/.installed

# Debian's packages, each installed only when its binary is missing, all in one apt-get (two at
# once would wait on dpkg's lock): Postgres and Redis for the scale-out profile's tests
# (tests/scale start private instances on loopback ports), wrk for the serving and scale
# benchmarks. $(call apt_install,<packages>) with any of: postgresql redis-server wrk.
HAS_postgresql := { ls /usr/lib/postgresql/*/bin/initdb || command -v initdb; } >/dev/null 2>&1
HAS_redis-server := command -v redis-server >/dev/null
HAS_wrk := command -v wrk >/dev/null
define apt_install
missing=""; $(foreach p,$(1),$(HAS_$(p)) || missing="$$missing $(p)";) \
if [ -n "$$missing" ]; then \
  echo "installing Debian's$$missing"; \
  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
  && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       $$missing >/dev/null; \
fi
endef

services:
	@$(call apt_install,postgresql redis-server)

bench-tools:
	@$(call apt_install,wrk)

system-packages:
	@$(call apt_install,postgresql redis-server wrk)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmark at its documented size (benchmarks/RESULTS.md), each writing its results file
# under benchmarks/results/; then the README's and RESULTS.md's tables are generated from the
# newest full-size file of each. Hours on 2 cores, unattended.
BENCHMARKS := bench-validation bench-training bench-features bench-drift bench-backtest \
	bench-backtest-delivery bench-serving bench-serving-delivery bench-scale bench-ingest \
	bench-first-model bench-loop bench-release bench-release-delivery
.PHONY: $(BENCHMARKS) bench-report
bench: $(BENCHMARKS)
	$(MAKE) bench-report

bench-report: setup
	$(BIN)/python -m benchmarks.report

bench-validation: setup
	$(BIN)/python -m benchmarks.bench_validation --rows 1000000

# The classifier and the regressor, on the CPU (2 torch threads), each with train_model from Polars.
bench-training: setup
	$(BIN)/python -m benchmarks.bench_training --rows 1000000 --epochs 3 --repeats 3 --threads 2 --frame
	$(BIN)/python -m benchmarks.bench_training --rows 1000000 --epochs 3 --repeats 3 --threads 2 --frame --task regression

# The dense shape (the simulator's 2,000 cards) and the sparse one (40,000 cards).
bench-features: setup
	$(BIN)/python -m benchmarks.bench_features
	$(BIN)/python -m benchmarks.bench_features --cards 40000 --merchants 2000 --lookups 1000

# The full 10-minute soak of tests/reliability (make test runs a 30 s variant of the same test).
.PHONY: soak
soak: setup
	LOOPLINE_SOAK_SECONDS=600 $(BIN)/pytest -s tests/reliability/test_serving_reliability.py -k soak

# A month of unattended running in about an hour (issue 18): faults injected, nothing lost,
# disk and monitoring cost flat; report and plot in soak-results/ (make test runs 3 days).
.PHONY: soak-month
soak-month: setup
	LOOPLINE_USECASE=delivery $(BIN)/python -m tests.soak.driver --days 30 --speed 720

# Both demos end to end with a real daemon and TorchServe, their live metric before the drift,
# after it and on recovery asserted (fraud 25-35 min: its labels mature in 7 simulated days;
# delivery ~15); make test runs the loop for both at once in tests/e2e/test_platform_e2e.py.
.PHONY: demo-e2e
demo-e2e: setup
	$(BIN)/pytest -m soak tests/e2e/test_loop_daemon_e2e.py

# Loop latency: `loopline demo` against a default-interval Dagster sensor, with the demo's
# trigger settings and with `loopline run`'s (15-25 min each).
.PHONY: bench-loop
bench-loop: setup
	$(BIN)/python -m benchmarks.bench_loop
	$(BIN)/python -m benchmarks.bench_loop --triggers platform

.PHONY: bench-ingest bench-first-model
bench-ingest: setup
	$(BIN)/python -m benchmarks.bench_ingest --files 100

bench-first-model: setup
	$(BIN)/python -m benchmarks.bench_first_model

.PHONY: bench-scale
bench-scale: setup services bench-tools
	$(BIN)/python -m benchmarks.bench_scale

# The serving benchmark's two-hop peer (feast serve + FastAPI) gets its own venv for its own
# packages (httpx, py-spy); Feast, FastAPI, uvicorn and torch come from .venv through a .pth file,
# so both sides run the same versions and the product's environment gains nothing.
.PHONY: bench-serving bench-serving-delivery

# At the demo's key space (the test kit's 120 cards: every lookup soon answered from memory),
# then at a million cards, 3M simulated transactions, 200k request bodies over every card seen:
# no cache holds them (setup ~5 min).
bench-serving: setup bench-tools $(PEER)/.installed
	$(BIN)/python -m benchmarks.bench_serving --peer-python $(PEER)/bin/python
	$(BIN)/python -m benchmarks.bench_serving --peer-python $(PEER)/bin/python --rounds 3 \
	  --scenario n_cards=1000000 --requests 3000000 --bodies 200000

# The delivery demo's regressor (the peer is written for fraud's transactions: it is skipped).
bench-serving-delivery: setup bench-tools
	LOOPLINE_USECASE=delivery $(BIN)/python -m benchmarks.bench_serving --rounds 2

$(PEER)/.installed: benchmarks/requirements-peer.txt $(STAMP)
	@test -x $(PEER)/bin/python || $(BIN)/python -m venv $(PEER)
	$(BIN)/python -c 'import site; print(f"import site; site.addsitedir({site.getsitepackages()[0]!r})")' \
	  > "$$($(PEER)/bin/python -c 'import site; print(site.getsitepackages()[0])')/loopline-product.pth"
	$(PEER)/bin/pip install --quiet --disable-pip-version-check -r benchmarks/requirements-peer.txt
	@touch $@

clean:
	rm -rf .loopline

# Drift statistics vs Evidently (issue 6). Evidently gets its own venv with its own pandas (<3),
# not the product's site-packages: what it pulls in cannot reach .venv.
.PHONY: bench-drift

bench-drift: setup $(DRIFT_PEER)/.installed
	$(BIN)/python -m benchmarks.bench_drift --peer-python $(DRIFT_PEER)/bin/python

$(DRIFT_PEER)/.installed: benchmarks/requirements-drift-peer.txt
	@test -x $(DRIFT_PEER)/bin/python || $(PYTHON) -m venv $(DRIFT_PEER)
	$(DRIFT_PEER)/bin/pip install --quiet --disable-pip-version-check -r benchmarks/requirements-drift-peer.txt
	@touch $@

# 30 simulated days of the demo's scenario through static, nightly and triggers (issue 14).
.PHONY: bench-backtest bench-backtest-delivery
bench-backtest: setup
	$(BIN)/python -m benchmarks.bench_backtest

# The delivery demo's rain, 22 served days, drift from the third (issue 16's scenario).
bench-backtest-delivery: setup
	LOOPLINE_USECASE=delivery $(BIN)/python -m benchmarks.bench_backtest --days 22 --drift-after 3

# Release integrity (issue 19): 20 sound retrains of the demo data and 20 A/A releases through
# delivery against a real TorchServe: delivery's false-rejection rate, 18-23 min a use case on
# 2 cores (LOOPLINE_USECASE=delivery for the regressor); each trial's details in
# benchmarks/results/release/.
.PHONY: bench-release bench-release-delivery
bench-release: setup
	$(BIN)/python -m benchmarks.bench_release

bench-release-delivery: setup
	LOOPLINE_USECASE=delivery $(BIN)/python -m benchmarks.bench_release
