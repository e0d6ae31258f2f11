# One entry point for humans and CI. Everything the project needs is installed from here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv test lint typecheck unit demo bench bench-deps clean system-deps lock

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the integration tests drive for real (redis-server, nginx, xmlsec1, caddy
# for config/forward-auth/Caddyfile, set-misc for nginx-cached-setmisc.conf, the Lua module,
# which brings lua-resty-core, for nginx-lua.conf, haproxy for config/haproxy, tomcat10 as the
# liberal upstream of tests/attacks; podman with runc, and debootstrap for the image's offline
# base, for tests/container); prometheus (the server and promtool) for tests/observability.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v xmlsec1 >/dev/null 2>&1 || missing="$$missing xmlsec1"; \
	command -v caddy >/dev/null 2>&1 || missing="$$missing caddy"; \
	command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	[ -f /usr/lib/nginx/modules/ngx_http_set_misc_module.so ] || missing="$$missing libnginx-mod-http-set-misc"; \
	[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing="$$missing libnginx-mod-http-lua"; \
	[ -x /usr/share/tomcat10/bin/catalina.sh ] || missing="$$missing tomcat10"; \
	command -v podman >/dev/null 2>&1 || missing="$$missing podman"; \
	command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || missing="$$missing runc"; \
	command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The image's pinned dependencies with hashes: the runtime ones, the speed extra and the build
# backend (pyproject.toml's build-system.requires, read from there), re-resolved to the newest
# releases pyproject.toml allows, for every Python 3.11+ (a base image's patch release may
# need other packages: redis wants async-timeout before 3.11.3).
lock: venv
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(BIN)/uv pip compile --quiet --upgrade --universal --python-version 3.11 --extra speed \
			--generate-hashes --custom-compile-command "make lock" \
			--output-file requirements.lock pyproject.toml -

lint: venv
	$(BIN)/ruff check gateway tests bench fuzz
	$(BIN)/ruff format --check gateway tests bench fuzz

typecheck: venv
	$(BIN)/mypy

unit: venv system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

demo: venv
	$(BIN)/saml-gateway demo

# The load generator of the throughput benchmarks; not needed by `make test`.
bench-deps:
	@command -v wrk >/dev/null 2>&1 || { \
		echo "installing system packages: wrk"; \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends wrk; \
	}

# Each script is bounded (under a minute) and prints its figures and ratios.
bench: venv system-deps bench-deps
	$(BIN)/python bench/validate.py
	$(BIN)/python bench/cache.py
	$(BIN)/python bench/redis_store.py
	$(BIN)/python bench/replicas.py
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/forward_auth.py
	$(BIN)/python bench/tracing.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info .cache
