"""Command line: ``saml-gateway run | check-config | demo | healthcheck``.

Exit codes: 0 success, 1 runtime failure (e.g. a port in use), 2 configuration errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.logs import setup_logging

if TYPE_CHECKING:
    from gateway.cache.entry import SharedStore

log = logging.getLogger("gateway")

_STARTUP_SECONDS = 5.0  # a worker that exits sooner failed to start

# What the supervisor hands each worker. The host store's sealing secret travels through an
# inherited pipe (its descriptor number in the environment), never in the environment itself.
WORKER_ENV = "SAML_GATEWAY_WORKER"  # the worker's slot, 1..N: its log lines carry it
HOST_STORE_ENV = "SAML_GATEWAY_HOST_STORE"  # the token database the workers share
HOST_STORE_KEY_FD_ENV = "SAML_GATEWAY_HOST_STORE_KEY_FD"
LISTENING_FD_ENV = "SAML_GATEWAY_LISTENING_FD"  # a pipe the worker writes to once it listens
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (it is faster), else on asyncio's own loop."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def serve(
    config: Config,
    config_path: Path,
    *,
    reuse_port: bool = False,
    host_store: SharedStore | None = None,
) -> int:
    from gateway.app import GatewayServer

    try:
        server = GatewayServer(
            config, config_path=config_path, reuse_port=reuse_port, host_store=host_store
        )
    except ConfigError as exc:  # e.g. a Redis encryption key too short to use
        _report(str(config_path), exc.problems)
        return 2
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        await server.close()
        return 1
    _tell_supervisor_listening()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def on_stop() -> None:
        if stop.is_set():
            server.hurry()  # asked twice: do not wait out the grace period
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop)
    loop.add_signal_handler(signal.SIGINT, on_stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    await server.shutdown()
    return 0


def _tell_supervisor_listening() -> None:
    fd = os.environ.pop(LISTENING_FD_ENV, None)
    if fd is None or not fd.isdigit():
        return
    with contextlib.suppress(OSError):  # a supervisor gone away has nothing to learn
        os.write(int(fd), b"1")
        os.close(int(fd))


def supervise(
    config_path: Path, args: argparse.Namespace, workers: int, *, share_tokens: bool = True
) -> int:
    """``workers: N``: N processes share the listener port (SO_REUSEPORT); signals are relayed.

    A worker of the first generation that exits before it listens (a port in use, say)
    would only fail again: then every worker is stopped and its code returned. Each worker
    says when it listens (a byte on a pipe), so a slow start on a loaded host is not taken
    for a crash, nor a crash for a failed start. A worker that dies later is replaced, with
    a growing pause if replacements keep dying within their first seconds.

    The workers of one run share a private runtime folder (0700, removed at exit): the
    metrics of all of them (prometheus-client's multiprocess files) and, with
    ``share_tokens`` (no Redis), the SQLite token store, sealed under a secret drawn here.
    """
    runtime = Path(tempfile.mkdtemp(prefix="saml-gateway-", dir=_runtime_base()))
    try:
        return _supervise(config_path, args, workers, runtime, share_tokens)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _runtime_base() -> str | None:
    """$XDG_RUNTIME_DIR (a per-user tmpfs) when usable, else the system's temporary folder."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    usable = base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)
    return base if usable else None


def _supervise(
    config_path: Path, args: argparse.Namespace, workers: int, runtime: Path, share_tokens: bool
) -> int:
    from prometheus_client.multiprocess import mark_process_dead

    command = [sys.executable, "-m", "gateway", "run", "-c", str(config_path), "--worker"]
    if args.log_format:
        command += ["--log-format", args.log_format]
    if args.log_level:
        command += ["--log-level", args.log_level]
    metrics = runtime / "metrics"
    metrics.mkdir()
    env = {**os.environ, METRICS_ENV: str(metrics)}
    secret = None
    if share_tokens:
        from gateway.cache.sqlite import create_database, new_secret

        env[HOST_STORE_ENV] = str(create_database(runtime))
        secret = new_secret().encode()

    listening_pipes: list[int] = []  # read ends, by slot
    listening = [False] * workers

    def spawn(slot: int) -> tuple[subprocess.Popen[bytes], float]:
        child_env = {**env, WORKER_ENV: str(slot + 1)}
        told, tell = os.pipe()
        os.set_blocking(told, False)
        if slot < len(listening_pipes):
            os.close(listening_pipes[slot])
            listening_pipes[slot] = told
        else:
            listening_pipes.append(told)
        listening[slot] = False
        child_env[LISTENING_FD_ENV] = str(tell)
        inherited: tuple[int, ...] = (tell,)
        if secret is not None:
            read_end, write_end = os.pipe()
            os.write(write_end, secret)  # far below the pipe's buffer: never blocks
            os.close(write_end)
            child_env[HOST_STORE_KEY_FD_ENV] = str(read_end)
            inherited += (read_end,)
        try:
            # The worker ignores SIGHUP until its own reload handler is in place.
            child = subprocess.Popen(  # noqa: S603 - our own argv
                command, preexec_fn=_ignore_sighup, env=child_env, pass_fds=inherited
            )
        finally:
            for fd in inherited:
                os.close(fd)
        return child, time.monotonic()

    def heard(slot: int) -> bool:
        """Whether the worker in ``slot`` has said it listens (reads without waiting)."""
        if not listening[slot]:
            with contextlib.suppress(BlockingIOError):
                listening[slot] = os.read(listening_pipes[slot], 1) == b"1"
        return listening[slot]

    children = [spawn(slot) for slot in range(workers)]
    first_generation = [True] * workers
    pause = [0.0] * workers  # before the next replacement of that slot
    stopping = False

    def relay(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum in (signal.SIGTERM, signal.SIGINT)
        for child, _ in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, relay)
    while True:
        for i, (child, started) in enumerate(children):
            code = child.poll()
            if code is None or stopping:
                continue
            quick = time.monotonic() - started < _STARTUP_SECONDS
            if first_generation[i] and not heard(i):
                log.error("worker %d failed at start (exit %d); stopping", child.pid, code)
                relay(signal.SIGTERM, None)
                for other, _ in children:
                    other.wait()
                return _exit_status(code)
            # its gauges stop counting (the "live" aggregates); its counters stay in the sums
            mark_process_dead(child.pid, str(metrics))  # type: ignore[no-untyped-call]  # unannotated upstream
            pause[i] = min(max(pause[i] * 2, 1.0), 30.0) if quick else 0.0
            log.error(
                "worker %d exited with %d; starting a new one in %.0f s", child.pid, code, pause[i]
            )
            time.sleep(pause[i])
            if not stopping:  # a stop may have come during the pause
                children[i], first_generation[i] = spawn(i), False
        if stopping and all(child.poll() is not None for child, _ in children):
            # A worker still starting when the stop came dies of the relayed signal: that
            # is the stop asked for, not a failure.
            stopped = (-signal.SIGTERM, -signal.SIGINT)
            codes = [child.returncode for child, _ in children]
            return max((_exit_status(code) for code in codes if code not in stopped), default=0)
        time.sleep(0.2)


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _exit_status(code: int) -> int:
    """A child's return code as a shell would report it (killed by signal N: 128 + N)."""
    return 128 - code if code < 0 else code


def _report(source: str, problems: list[str]) -> None:
    print(f"configuration error in {source}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def _load(path: str) -> Config | None:
    """The configuration after the preflight that ``check-config`` runs too: every key, and
    every file it names (certificates, metadata, client keys, TLS files), so a bad one is a
    startup error naming its key, all of them in one report."""
    from gateway.cache import TokenCache
    from gateway.metrics import Metrics
    from gateway.pipeline import Pipeline
    from gateway.preflight import preflight

    try:
        config = preflight(path)
        Pipeline(config, TokenCache(config.cache), Metrics())  # what run builds; no socket
    except ConfigError as exc:
        _report(exc.source or path, exc.problems)
        return None
    return config


def cmd_run(args: argparse.Namespace) -> int:
    # A reload asked for before the handlers are in place must not kill the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = _load(args.config)
    if config is None:
        return 2
    slot = os.environ.get(WORKER_ENV, "") if args.worker else ""
    worker = int(slot) if slot.isdigit() else None
    log_format, log_level = args.log_format or config.log.format, args.log_level or config.log.level
    setup_logging(log_format, log_level, worker=worker)
    path = Path(args.config)
    if config.workers > 1 and not args.worker:
        share_tokens = config.cache.backend != "redis"
        return supervise(path, args, config.workers, share_tokens=share_tokens)
    host_store = _host_store(config) if args.worker else None
    return run_loop(serve(config, path, reuse_port=args.worker, host_store=host_store))


def _host_store(config: Config) -> SharedStore | None:
    """The token store the supervisor made for its workers, or None (Redis, or no supervisor)."""
    database, key_fd = os.environ.get(HOST_STORE_ENV), os.environ.pop(HOST_STORE_KEY_FD_ENV, None)
    if database is None or key_fd is None:
        return None
    from gateway.cache.sqlite import SqliteTokenStore

    with os.fdopen(int(key_fd), "rb") as pipe:
        secret = pipe.read().decode()
    # A hold ends when the exchange does (retries included) or, if its worker died, when the
    # lock expires: waiting that long never waits for nothing.
    longest = max(server.retries.deadline for server in config.authorization_servers.values())
    lock_ttl = 10.0
    return SqliteTokenStore(Path(database), secret, lock_ttl=lock_ttl, lock_wait=longest + lock_ttl)


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.allow_missing_env:
        return _check_template(args.config)
    config = _load(args.config)
    if config is None:
        return 2
    print(f"# {args.config}: OK (secrets redacted)")
    print(yaml.safe_dump(config.redacted(), sort_keys=False), end="")
    return 0


# ``explain`` (exit 1: the assertion is refused; 2: bad usage or config), ``init``, and
# ``--version`` are the first-contact commands.


def _check_template(path: str) -> int:
    """``check-config --allow-missing-env``: a file whose ``${VAR}``s are not all set yet.

    Each unset variable gets a stand-in value for the one check, and is reported as a
    warning, with every problem its stand-in caused; all other problems are errors as usual.
    """
    from gateway.cache import TokenCache
    from gateway.metrics import Metrics
    from gateway.pipeline import Pipeline
    from gateway.preflight import preflight
    from gateway.starter import variables

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""  # the preflight reports it
    # Long enough for the length rules (sealing keys), and recognisable in a problem.
    stand_ins = {name: f"unset-{name}-" + "x" * 32 for name in variables(text)}
    stand_ins = {name: value for name, value in stand_ins.items() if name not in os.environ}
    os.environ.update(stand_ins)
    try:
        config = preflight(path)
        Pipeline(config, TokenCache(config.cache), Metrics())  # what run builds; no socket
        problems: list[str] = []
    except ConfigError as exc:
        problems = exc.problems
    finally:
        for name in stand_ins:
            del os.environ[name]
    waiting = [p for p in problems if any(value in p for value in stand_ins.values())]
    for name in stand_ins:
        print(f"warning: environment variable {name!r} is not set", file=sys.stderr)
    for problem in waiting:
        print(f"warning: checked once the variable is set: {problem}", file=sys.stderr)
    errors = [p for p in problems if p not in waiting]
    if errors:
        _report(path, errors)
        return 2
    print(f"# {path}: OK apart from {len(stand_ins)} unset variable(s)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from gateway.explain import explain, find_route, render_json, render_text

    config = _load(args.config)
    if config is None:
        return 2
    try:
        route = find_route(config, args.route)
    except LookupError as exc:
        print(f"saml-gateway explain: {exc}", file=sys.stderr)
        return 2
    clock = "system clock"
    now = datetime.now(UTC)
    if args.at is not None:
        try:
            now = datetime.fromisoformat(args.at)
        except ValueError:
            print(f"saml-gateway explain: --at {args.at!r} is not ISO 8601", file=sys.stderr)
            return 2
        now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
        clock = "--at"
    try:
        if args.file == "-":
            if sys.stdin.isatty():
                print("reading the assertion from stdin (end with Ctrl-D)", file=sys.stderr)
            data = sys.stdin.buffer.read()
        else:
            data = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"saml-gateway explain: cannot read {args.file!r}: {exc.strerror}", file=sys.stderr)
        return 2
    report = explain(config, route, data, now, clock=clock)
    print(render_json(report) if args.json else render_text(report), end="")
    return report.exit_code


def cmd_init(args: argparse.Namespace) -> int:
    from gateway.starter import starter_config, variables

    text = starter_config(args.profile)
    if args.output in (None, "-"):
        print(text, end="")
        return 0
    target = Path(args.output)
    if target.exists() and not args.force:
        print(f"saml-gateway init: {target} exists (--force to overwrite)", file=sys.stderr)
        return 2
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"saml-gateway init: cannot write {target}: {exc.strerror}", file=sys.stderr)
        return 2
    names = " ".join(variables(text))
    print(f"wrote {target}; set {names}, then: saml-gateway check-config -c {target}")
    return 0


def _version() -> str:
    try:
        return f"saml-gateway {metadata.version('saml-oauth-gateway')}"
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "saml-gateway (not installed)"


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    setup_logging(args.log_format or "text", "warning")
    with contextlib.suppress(KeyboardInterrupt):
        return run_loop(run_demo(port=args.port, admin_port=args.admin_port, once=args.once))
    return 0


DEFAULT_CONFIG = "/etc/saml-gateway/gateway.yaml"  # the container image's


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"must be between 0 and 60 seconds: {text}")
    return value


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """GET /readyz on the admin listener the config names: 0 ready, 1 not (for a container
    HEALTHCHECK, where 2 is reserved). Only the ``admin`` section is read: the check is about
    the running server, not about whether the rest of the file would load again."""
    import http.client
    import urllib.error
    import urllib.request

    from pydantic import ValidationError

    from gateway.config import AdminListener

    try:
        data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
        section = data.get("admin") if isinstance(data, dict) else None
        admin = AdminListener.model_validate(section or {})
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        print(f"unhealthy: cannot read config file {args.config}: {why}", file=sys.stderr)
        return 1
    except yaml.YAMLError:
        print(f"unhealthy: {args.config}: not valid YAML", file=sys.stderr)
        return 1
    except ValidationError as exc:
        for error in exc.errors():
            key = ".".join(["admin", *map(str, error["loc"])])
            print(f"unhealthy: {args.config}: {key}: {error['msg']}", file=sys.stderr)
        return 1
    if not admin.enabled or admin.port == 0:
        why = "disabled" if not admin.enabled else "on a random port (admin.port: 0)"
        print(f"unhealthy: the admin listener is {why} in {args.config}", file=sys.stderr)
        return 1
    # A wildcard bind is reached on loopback; an IPv6 literal needs brackets in a URL.
    wildcards = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - not a bind
    host = wildcards.get(admin.host, admin.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{admin.port}/readyz"
    # No proxy: a proxy from the environment must not answer for this container's port.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timed out, garbled
        reason = getattr(exc, "reason", None) or exc
        print(f"unhealthy: {url}: {reason}", file=sys.stderr)
        return 1
    print(f"{'healthy' if status == 200 else 'unhealthy'}: {url}: {status}")
    return 0 if status == 200 else 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="saml-gateway", description="Swap SAML 2.0 assertions for OAuth access tokens."
    )
    top.add_argument("-V", "--version", action="version", version=_version())
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    run.add_argument("--log-format", choices=("json", "text"), help="overrides log.format")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check-config", help="validate a configuration file and print it")
    check.add_argument("-c", "--config", required=True)
    check.add_argument(
        "--allow-missing-env",
        action="store_true",
        help="report unset ${VAR}s as warnings and check the rest",
    )
    check.set_defaults(func=cmd_check_config)
    why = sub.add_parser(
        "explain",
        help="say why one assertion is accepted or refused, check by check",
        description="Run the proxy's validation for one route over one assertion (base64, "
        "base64url or XML; bare or in a samlp:Response) and print what each check expected "
        "and found. Exit 0 accepted, 1 refused, 2 bad usage or config.",
    )
    why.add_argument("-c", "--config", required=True)
    why.add_argument("--route", help="route name or path prefix (default: the first route)")
    why.add_argument("--at", help="check the time conditions at this ISO 8601 instant")
    why.add_argument("--json", action="store_true", help="print one JSON object")
    why.add_argument("file", nargs="?", default="-", help="the assertion (default: - = stdin)")
    why.set_defaults(func=cmd_explain)
    from gateway.starter import PROFILES

    init = sub.add_parser("init", help="write a commented starter configuration")
    init.add_argument("--profile", required=True, choices=PROFILES, help="authorization server")
    init.add_argument("-o", "--output", help="file to write (default: stdout)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)
    demo = sub.add_parser(
        "demo", help="run an IdP, an authorization server, an API and the gateway"
    )
    demo.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8080")))
    demo.add_argument(
        "--admin-port", type=int, default=int(os.environ.get("DEMO_ADMIN_PORT", "9901"))
    )
    demo.add_argument("--once", action="store_true", help="walk through the demo, then exit")
    demo.add_argument("--log-format", choices=("json", "text"))
    demo.set_defaults(func=cmd_demo)
    health = sub.add_parser(
        "healthcheck", help="exit 0 if the admin listener's /readyz answers 200, else 1"
    )
    health.add_argument(
        "-c",
        "--config",
        default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG),
        help=f"the config the gateway runs with (default: $GATEWAY_CONFIG or {DEFAULT_CONFIG})",
    )
    health.add_argument(
        "--timeout", type=_seconds, default=2.0, help="for the request, in seconds (default: 2)"
    )
    health.set_defaults(func=cmd_healthcheck)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code
