# One entry point for humans and CI. Everything the project needs is installed from here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv test lint typecheck unit demo bench bench-deps clean system-deps

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
# which brings lua-resty-core, for nginx-lua.conf, and tomcat10 as the liberal upstream of
# tests/attacks).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v xmlsec1 >/dev/null 2>&1 || missing="$$missing xmlsec1"; \
	command -v caddy >/dev/null 2>&1 || missing="$$missing caddy"; \
	[ -f /usr/lib/nginx/modules/ngx_http_set_misc_module.so ] || missing="$$missing libnginx-mod-http-set-misc"; \
	[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing="$$missing libnginx-mod-http-lua"; \
	[ -x /usr/share/tomcat10/bin/catalina.sh ] || missing="$$missing tomcat10"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

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

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
