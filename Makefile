# Azora Email Hosting — developer and CI entry points. `make help` lists the targets.
#
# Every target that needs tools depends on `deps`, which is idempotent and quick once done, so a
# fresh clone needs nothing but `make test` (or `make run`). Only package registries are used:
# Debian packages (apt), Python packages (pip, pinned by requirements/lock.txt), buf (npm,
# pinned by package-lock.json), FerretDB, grpcurl and code generators (Go modules at pinned
# versions).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# Targets run in the order they are listed (deps before generate before lint before tests), even
# under `make -j`: several of them write the same files.
.NOTPARALLEL:
MAKEFLAGS += --no-builtin-rules

# Debian packages the tests and the local suite need. knot: authoritative DNS server for the
# domain-verification tests (tests/support/dns_server.py); chromium: headless browser for the
# Swagger UI test (tests/gateway/test_swagger_ui.py, driven by Playwright, never downloaded);
# opendkim: an independent DKIM verifier for the signing tests (tests/smtp); swaks with
# libnet-ssleay-perl (its TLS): a real SMTP client for the submission tests (tests/submission);
# patch: applies the local FerretDB changes (scripts/build_ferretdb.sh).
APT_PACKAGES := knot chromium opendkim swaks libnet-ssleay-perl patch

PYTHON3 ?= python3
ifndef GO
GO := $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
endif
GRPCURL_VERSION := v1.9.3

VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
# Written after a successful `pip install`; lives inside the venv so that deleting .venv also
# forgets it (and `make clean` does not force a reinstall).
VENV_STAMP := $(VENV)/.azora-installed
# googleapis protos imported by protos/, vendored from the pinned googleapis-common-protos wheel.
GOOGLEAPIS_PROTOS := \
	google/api/annotations.proto google/api/http.proto google/api/httpbody.proto \
	google/api/field_behavior.proto \
	google/rpc/status.proto google/rpc/code.proto google/rpc/error_details.proto

# Tests and the local suite find bin/ferretdb, bin/grpcurl and knotd (in /usr/sbin) on PATH.
RUN_ENV := PATH="$(CURDIR)/bin:/usr/sbin:$$PATH"

.PHONY: help
help: ## List the targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z0-9_.-]+:.*## / { printf "  %-16s %s\n", $$1, $$2 }' \
		$(MAKEFILE_LIST)

# --------------------------------------------------------------------------- dependencies

.PHONY: deps
deps: apt-packages $(VENV_STAMP) $(BUF) ferretdb grpcurl go-tools ## Install everything a fresh machine needs (idempotent)

.PHONY: apt-packages
apt-packages: ## Install missing Debian packages (the APT_PACKAGES list)
	@scripts/install_debian_packages.sh $(APT_PACKAGES)

$(PY):
	$(PYTHON3) -m venv $(VENV)

$(VENV_STAMP): $(PY) pyproject.toml requirements/lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e '.[dev]'
	touch $@

# The lock is resolved from pyproject.toml (every runtime and `dev` dependency, plus pip itself,
# which `deps` installs first) by uv, pinned in the lock like any dev tool, for this venv's
# Python. uv keeps every version already in the lock unless the new constraints need another:
# `make lock LOCK_ARGS=--upgrade` moves everything to the newest versions,
# `make lock LOCK_ARGS='--upgrade-package aiohttp'` one package.
LOCK_ARGS ?=

.PHONY: lock
lock: $(VENV_STAMP) ## Resolve requirements/lock.txt from pyproject.toml (uv pip compile)
	@mkdir -p requirements
	printf 'pip\n' | $(VENV)/bin/uv pip compile --quiet --python $(PY) --extra dev \
		--custom-compile-command 'make lock' $(LOCK_ARGS) \
		pyproject.toml - --output-file requirements/lock.txt

$(BUF): package.json package-lock.json
	@# `npm ci` refuses a lock file that lacks an entry for any optional dependency, and a lock
	@# written where the registry serves only buf's Linux packages lacks the darwin/win32/armv7
	@# ones. Fall back to `npm install --no-save` (installs the locked versions, never rewrites
	@# the lock) and then insist that the installed buf is exactly the locked version.
	npm ci --no-audit --no-fund || npm install --no-audit --no-fund --no-save
	@want="$$(node -p 'require("./package-lock.json").packages["node_modules/@bufbuild/buf"].version')"; \
	got="$$($(BUF) --version)"; \
	if [[ "$$got" != "$$want" ]]; then \
		echo "buf $$got installed, but package-lock.json pins $$want" >&2; exit 1; \
	fi
	@# npm may keep the old file times; make must see the tool as newer than the lock file.
	touch $@

.PHONY: ferretdb
ferretdb: ## Build bin/ferretdb at the version pinned in tools/ferretdb/go.mod
	@GO="$(GO)" scripts/build_ferretdb.sh

.PHONY: grpcurl
grpcurl: ## Install bin/grpcurl at GRPCURL_VERSION
	@# grpcurl built by `go install` prints "dev build" for -version; the module version is only
	@# in the build info, so ask `go version -m`. Its output is captured rather than piped into
	@# `grep -q`, which would exit early and fail the pipeline (pipefail) with SIGPIPE.
	@info="$$("$(GO)" version -m bin/grpcurl 2>/dev/null || true)"; \
	if ! grep -qP '^\tmod\tgithub.com/fullstorydev/grpcurl\t\Q$(GRPCURL_VERSION)\E\t' <<<"$$info"; then \
		echo "installing grpcurl $(GRPCURL_VERSION) into bin/" >&2; \
		GOBIN="$(CURDIR)/bin" "$(GO)" install \
			github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION); \
	fi

.PHONY: go-tools
go-tools: ## Install the Go code generators pinned in scripts/build_go_tools.sh into bin/
	@GO="$(GO)" scripts/build_go_tools.sh

# --------------------------------------------------------------------------- generated code

.PHONY: generate
generate: $(VENV_STAMP) $(BUF) go-tools ## Regenerate gen/ (stubs, descriptor set, ...) from protos/
	@# buf.gen.yaml runs plugins from .venv (grpc_tools.protoc, protoc-gen-mypy*) and bin/.
	rm -rf gen/python gen/openapi
	$(BUF) generate
	$(BUF) build -o gen/azora.binpb
	@# Title, version, security and HttpBody responses the generator cannot know (see the script).
	$(PY) scripts/postprocess_openapi.py gen/openapi/azora.swagger.json --descriptor-set gen/azora.binpb
	@# Kubernetes gets gateway/envoy.yaml verbatim through a generated ConfigMap.
	$(PY) scripts/gen_k8s_envoy_config.py

.PHONY: vendor-protos
vendor-protos: $(VENV_STAMP) ## Re-copy the googleapis protos into third_party/ from the pinned wheel
	@site="$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
	for proto in $(GOOGLEAPIS_PROTOS); do \
		install -D -m 644 "$$site/$$proto" "third_party/googleapis/$$proto"; \
	done

.PHONY: check-generated
check-generated: vendor-protos generate ## Fail if generated or vendored files differ from the repository
	@changes="$$(git status --porcelain --untracked-files=all -- gen third_party k8s)"; \
	if [[ -n "$$changes" ]]; then \
		echo "Generated or vendored files are stale or not committed:" >&2; \
		echo "$$changes" >&2; \
		echo "Run \`make vendor-protos generate\` and commit the result." >&2; \
		exit 1; \
	fi

# --------------------------------------------------------------------------- quality

.PHONY: lint
lint: $(VENV_STAMP) $(BUF) ## buf lint + breaking, ruff check + format check, mypy
	@# .pre-commit-config.yaml runs the same commands on commit; keep the two lists equal
	@# (tests/unit/test_tooling.py compares them).
	$(BUF) lint
	BUF=$(BUF) scripts/buf_breaking.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services gateway tests scripts bench

.PHONY: format
format: $(VENV_STAMP) ## Format and auto-fix Python code (ruff)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# --------------------------------------------------------------------------- tests

# The tests run once, with branch coverage of services/ and gateway/ ([tool.coverage] in
# pyproject.toml), and the run fails when coverage drops under `fail_under` there. CI
# (`make test`) measures too: the suite waits mostly on FerretDB and sockets, so coverage cost
# nothing measurable (1,026 tests: 3 min 06 s with it, 3 min 08 s without, on a shared 2-core
# machine), far less than a second run would.
COVERAGE_ARGS := --cov --cov-report=term --cov-report=xml:build/coverage.xml

.PHONY: test
test: deps check-generated lint ## Everything CI runs: deps, generated-code check, lint, tests with coverage
	@mkdir -p build
	$(RUN_ENV) $(PY) -m pytest $(COVERAGE_ARGS)

.PHONY: coverage
coverage: deps ## Only the tests with branch coverage (terminal + build/coverage.xml; fails under the floor)
	@mkdir -p build
	$(RUN_ENV) $(PY) -m pytest $(COVERAGE_ARGS)

FUZZ_EXAMPLES ?= 1000

.PHONY: fuzz
fuzz: deps ## Long API fuzzing run (FUZZ_EXAMPLES generated requests per operation and mode)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(RUN_ENV) $(PY) -m pytest --timeout=0 \
		tests/security/test_api_fuzzing.py

# --------------------------------------------------------------------------- running

.PHONY: run
run: deps ## Run the three services (+ embedded FerretDB unless MONGODB_URI is set)
	$(RUN_ENV) $(PY) scripts/run_suite.py

.PHONY: dev
dev: deps ## Like `run`, restarting the suite when Python code changes
	@# watchfiles stops the suite with SIGINT; run_suite needs up to ~25 s to drain the
	@# services (15 s grace) and stop FerretDB, so do not SIGKILL it after the default 5 s.
	$(RUN_ENV) $(VENV)/bin/watchfiles --filter python --sigint-timeout 30 \
		'$(PY) scripts/run_suite.py' services gen/python

# --------------------------------------------------------------------------- benchmarks and drills

# Debian packages only the benchmarks and drills need (not the tests): postfix (smtp-source,
# smtp-sink, the Postfix relay), opendkim + opendkim-tools (milter and key generation).
BENCH_APT_PACKAGES := postfix opendkim opendkim-tools
# Counts and durations (docs/benchmarks.md): defaults finish in minutes on the current queue.
# 3,000 per row: about ten seconds of ours, so that a run outlasts the machine's short
# disturbances (on one commit, quiet machine: three runs of 500 spread 326-350 delivered/s,
# three of 3,000 333-343; the medians agreed, 338 and 335).
BENCH_MESSAGES ?= 3000
BENCH_POSTFIX_MESSAGES ?= 3000
BENCH_SCALE_MESSAGES ?= 1000
BENCH_WORKERS ?= 1,2,4
BENCH_GATEWAY_REQUESTS ?= 400
BENCH_CONCURRENCY ?= 16
# Runs per row of the main table (medians with min-max are printed).
BENCH_RUNS ?= 3
BENCH_OUT ?= build/bench/bench.json
SOAK_SECONDS ?= 1800
SOAK_RATE ?=
SOAK_OUT ?= build/bench/soak.json
DRILL_MESSAGES ?= 5000
DRILL_KILLS ?= 3
DRILL_DB_DOWN_SECONDS ?= 30
DRILL_RELAY_DOWN_SECONDS ?= 60
DRILL_TEMPFAIL_SECONDS ?= 30
DRILL_OUT ?= build/bench/drills.json
BENCH_ENV := $(RUN_ENV) PYTHONPATH="$(CURDIR)" BENCH_MESSAGES=$(BENCH_MESSAGES) \
	BENCH_POSTFIX_MESSAGES=$(BENCH_POSTFIX_MESSAGES) BENCH_SCALE_MESSAGES=$(BENCH_SCALE_MESSAGES) \
	BENCH_WORKERS=$(BENCH_WORKERS) BENCH_GATEWAY_REQUESTS=$(BENCH_GATEWAY_REQUESTS) \
	BENCH_CONCURRENCY=$(BENCH_CONCURRENCY) BENCH_RUNS=$(BENCH_RUNS) SOAK_SECONDS=$(SOAK_SECONDS) SOAK_RATE=$(SOAK_RATE) \
	DRILL_MESSAGES=$(DRILL_MESSAGES) DRILL_KILLS=$(DRILL_KILLS) \
	DRILL_DB_DOWN_SECONDS=$(DRILL_DB_DOWN_SECONDS) \
	DRILL_RELAY_DOWN_SECONDS=$(DRILL_RELAY_DOWN_SECONDS) \
	DRILL_TEMPFAIL_SECONDS=$(DRILL_TEMPFAIL_SECONDS)

.PHONY: bench-tools
bench-tools: deps ## Install Postfix, OpenDKIM (apt) and ghz (bin/) for the benchmarks
	@GO="$(GO)" scripts/build_bench_tools.sh $(BENCH_APT_PACKAGES)

.PHONY: bench
bench: bench-tools ## Postfix vs our suite, scale-out, gateway overhead: one table + JSON + charts
	$(BENCH_ENV) $(PY) -m bench.run --out $(BENCH_OUT)
	$(PY) -m bench.charts $(BENCH_OUT) --out-dir $(dir $(BENCH_OUT))charts

# `make bench-data`: reads and delivery on a database holding BENCH_DATA_EMAILS finished and
# BENCH_DATA_SCHEDULED far-future emails, next to an empty one and a small one holding full
# pages, the three measured interleaved (bench/data.py).
BENCH_DATA_EMAILS ?= 100000
BENCH_DATA_SCHEDULED ?= 20000
BENCH_DATA_REPEAT ?= 50
BENCH_DATA_OUT ?= build/bench/data.json

.PHONY: bench-data
bench-data: deps ## API reads and delivered/s on 100,000 stored emails vs empty and small databases
	$(RUN_ENV) PYTHONPATH="$(CURDIR)" $(PY) -m bench.data --emails $(BENCH_DATA_EMAILS) \
		--scheduled $(BENCH_DATA_SCHEDULED) --repeat $(BENCH_DATA_REPEAT) --out $(BENCH_DATA_OUT)

.PHONY: bench-postfix
bench-postfix: bench-tools ## Only the Postfix reference rows of `make bench`
	$(BENCH_ENV) $(PY) -m bench.run --phases postfix --out $(BENCH_OUT)

.PHONY: bench-scale
bench-scale: bench-tools ## Only the scale-out runs (1/2/4 workers) with their profile
	$(BENCH_ENV) $(PY) -m bench.run --phases scale --out $(BENCH_OUT)

.PHONY: bench-gateway
bench-gateway: bench-tools ## Only GetEmail/SendEmail over gRPC vs through the gateway
	$(BENCH_ENV) $(PY) -m bench.run --phases gateway --out $(BENCH_OUT)

.PHONY: bench-submission
bench-submission: bench-tools ## Only the SMTP submission row (STARTTLS + AUTH) of `make bench`
	$(BENCH_ENV) $(PY) -m bench.run --phases smtp --out $(BENCH_OUT)

.PHONY: bench-mime
bench-mime: deps ## MIME build per message: simple messages written directly vs the stdlib path
	$(RUN_ENV) PYTHONPATH="$(CURDIR)" $(PY) -m bench.mime

.PHONY: soak
soak: bench-tools ## Steady load at half the measured maximum for SOAK_SECONDS (default 30 min)
	$(BENCH_ENV) $(PY) -m bench.soak --out $(SOAK_OUT)
	$(PY) -m bench.charts $(SOAK_OUT) --out-dir $(dir $(SOAK_OUT))charts

.PHONY: drills
drills: bench-tools ## Fault drills (kill -9, database down, relay down/4xx, SIGTERM): PASS/FAIL
	$(BENCH_ENV) $(PY) -m bench.drills --out $(DRILL_OUT)

# --------------------------------------------------------------------------- cleaning

.PHONY: clean
clean: ## Remove build output, built tools and local data (build/, bin/, var/)
	rm -rf build bin var tools/ferretdb/vendor

.PHONY: distclean
distclean: clean ## Also remove .venv and node_modules
	rm -rf $(VENV) node_modules
