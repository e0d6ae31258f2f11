"""A throwaway ``redis-server`` on a loopback port, for tests and benchmarks.

It runs with no persistence (``--save '' --appendonly no``) in a directory the caller owns,
and can be stopped, killed and restarted on the same port, so fault tests and later the
multi-replica gateway tests can drive a real server. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

DEFAULT_BINARY = "redis-server"


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A loopback TCP port that was free a moment ago.

    Chosen below Linux's ephemeral range (32768+) on purpose: a port the OS hands out for
    ``bind(0)`` can be taken by any outgoing connection before the server binds it (tests
    open many), while ports down here are only ever taken by explicit binds.
    """
    for _ in range(200):
        port = secrets.randbelow(high - low) + low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")


def redis_server_binary() -> str | None:
    """The path of ``redis-server`` when installed (tests skip without it)."""
    return shutil.which(DEFAULT_BINARY) or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )


class PortTaken(RuntimeError):
    """Another process bound the port between our check and the server's bind."""


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``; usable as a context manager."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
        config_file: Path | None = None,
        binary: str | None = None,
    ) -> None:
        found = binary or redis_server_binary()
        # cluster nodes also listen on port + 10000 (the bus): keep both below 32768
        self._port_range = (12000, 22000) if "--cluster-enabled" in extra_args else (20000, 32000)
        self._port_is_fixed = port is not None
        if found is None:
            raise FileNotFoundError("redis-server is not installed (see `make system-deps`)")
        self.binary = found
        self.directory = directory
        self.port = port or free_port(*self._port_range)
        self.password = password
        self.extra_args = extra_args
        self.config_file = config_file  # first argument; e.g. a sentinel.conf (it is rewritten)
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running})"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (again, on the same port) and return once it answers PING."""
        if self.running:
            return
        for _ in range(5):
            try:
                self._spawn(timeout)
                break
            except PortTaken:
                if self._port_is_fixed:
                    raise
                self.port = free_port(*self._port_range)  # lost the race: pick another
        else:
            raise RuntimeError("redis-server could not bind a free port")
        self._port_is_fixed = True  # from now on, restarts come back on this port

    def _spawn(self, timeout: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            *((str(self.config_file),) if self.config_file else ()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", "",
            *(("--requirepass", self.password) if self.password else ()),
            *self.extra_args,
        ]  # fmt: skip
        log_path = self.directory / "redis.log"
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            # the binary and arguments come from the caller (tests, benches), never a request
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self._process.poll() is not None:
                self._process = None
                with log_path.open("rb") as log:
                    log.seek(log_start)
                    if b"Address already in use" in log.read():
                        raise PortTaken(self.port)
                raise RuntimeError(f"redis-server exited: see {log_path}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down politely (SIGTERM), or kill if it does not go in time."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self.resume()  # a paused server would not see SIGTERM until continued
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout)
        self._process = None

    def kill(self, timeout: float = 10.0) -> None:
        """Die at once (SIGKILL), as a crashed server would: clients see reset connections."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout)
        self._process = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open and nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(_command("AUTH", self.password))
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(_command("PING"))
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def _command(*parts: str) -> bytes:
    """One command in RESP, so readiness checks need no client library."""
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def start_sentinel(master: RedisServer, directory: Path, service: str = "mymaster") -> RedisServer:
    """A Sentinel watching ``master`` as ``service`` (quorum 1), started and answering."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sentinel.conf"  # Sentinel rewrites its config file, so one per run
    lines = [f"sentinel monitor {service} 127.0.0.1 {master.port} 1"]
    if master.password:
        lines.append(f"sentinel auth-pass {service} {master.password}")
    config.write_text("\n".join(lines) + "\n")
    sentinel = RedisServer(directory, config_file=config, extra_args=("--sentinel",))
    sentinel.start()
    return sentinel


def start_cluster(directory: Path, size: int = 3, timeout: float = 20.0) -> list[RedisServer]:
    """``size`` masters (no replicas) joined into a Redis Cluster with every slot covered."""
    cluster_args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    nodes = [
        RedisServer(
            directory / f"node{i}", extra_args=(*cluster_args, "--cluster-node-timeout", "2000")
        )
        for i in range(size)
    ]
    try:
        for node in nodes:
            node.start()
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        # the addresses are our own loopback servers
        addresses = [f"127.0.0.1:{n.port}" for n in nodes]
        create = [
            cli,
            "--cluster",
            "create",
            *addresses,
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]
        subprocess.run(  # noqa: S603
            create,
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(n.port) for n in nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


def _cluster_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(_command("CLUSTER", "INFO"))
            return b"cluster_state:ok" in sock.recv(4096)
    except OSError:
        return False


class SentinelGroup:
    """A master, one replica and ``count`` sentinels (quorum ``count // 2 + 1``) on loopback:
    a Sentinel setup that can really fail over, by ``SENTINEL FAILOVER`` or by killing the
    master. ``down_after_ms`` is how long a silent master takes to be called down (Sentinel's
    default of 30 s would make every kill test half a minute long); ``sentinel_password``
    makes the sentinels require one (``requirepass``, and ``sentinel sentinel-pass`` so they
    still talk to each other)."""

    def __init__(
        self,
        directory: Path,
        *,
        service: str = "tokens",
        password: str | None = None,
        sentinel_password: str | None = None,
        count: int = 3,
        down_after_ms: int = 1000,
    ) -> None:
        auth = ("--masterauth", password) if password else ()  # either may become a replica
        self.directory = directory
        self.service = service
        self.password = password
        self.sentinel_password = sentinel_password
        self.count = count
        self.down_after_ms = down_after_ms
        self.servers = [
            RedisServer(directory / "redis-a", password=password, extra_args=auth),
            RedisServer(directory / "redis-b", password=password, extra_args=auth),
        ]
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        """The gateway's ``cache.redis.url`` for this setup (every sentinel listed)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        auth = f":{self.sentinel_password}@" if self.sentinel_password else ""
        return f"redis+sentinel://{auth}{hosts}/{self.service}/0"

    def start(self, timeout: float = 60.0) -> None:
        """Start everything; return once every sentinel knows the replica and its peers (so
        a failover can be ordered at once)."""
        first, second = self.servers
        first.start()
        second.extra_args = (*second.extra_args, "--replicaof", "127.0.0.1", str(first.port))
        second.start()
        quorum = self.count // 2 + 1
        for i in range(self.count):
            folder = self.directory / f"sentinel{i}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "sentinel.conf"  # rewritten by Sentinel: one per run
            lines = [
                f"sentinel monitor {self.service} 127.0.0.1 {first.port} {quorum}",
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
                f"sentinel failover-timeout {self.service} 10000",
            ]
            if self.password:
                lines.append(f"sentinel auth-pass {self.service} {self.password}")
            if self.sentinel_password:
                lines.append(f"sentinel sentinel-pass {self.sentinel_password}")
            config.write_text("\n".join(lines) + "\n")
            sentinel = RedisServer(
                folder,
                config_file=config,
                password=self.sentinel_password,  # --requirepass, and the readiness check's
                extra_args=("--sentinel",),
            )
            self.sentinels.append(sentinel)
            sentinel.start()
        deadline = time.monotonic() + timeout
        while not all(self._knows_everyone(s) for s in self.sentinels):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "the sentinels did not discover the replica and each other (logs in "
                    f"{self.directory}): {[self._view(s) for s in self.sentinels]}"
                )
            time.sleep(0.1)

    def _sentinel_client(self, sentinel: RedisServer) -> redis.Redis:
        return redis.Redis(port=sentinel.port, password=self.sentinel_password, socket_timeout=1)

    def _knows_everyone(self, sentinel: RedisServer) -> bool:
        try:
            with self._sentinel_client(sentinel) as client:
                state = client.sentinel_master(self.service)
                replicas = client.sentinel_slaves(self.service)
        except redis.RedisError:
            return False
        return state["num-other-sentinels"] == self.count - 1 and any(
            r["master-link-status"] == "ok" and not r["is_sdown"] for r in replicas
        )

    def _view(self, sentinel: RedisServer) -> str:
        try:
            with self._sentinel_client(sentinel) as client:
                state = client.sentinel_master(self.service)
                replicas = client.sentinel_slaves(self.service)
        except redis.RedisError as exc:
            return f"{sentinel.port}: {exc}"
        links = [(r.get("port"), r.get("master-link-status"), r.get("flags")) for r in replicas]
        return f"{sentinel.port}: {state.get('num-other-sentinels')} others, replicas {links}"

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                with self._sentinel_client(sentinel) as client:
                    address = client.sentinel_get_master_addr_by_name(self.service)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def master_writes(self, server: RedisServer) -> int | None:
        """How many key-writing commands ``server`` has run (SET, the Lua scripts, DEL; not
        the sentinels' own traffic), or None once it is no master (a replica counts what it
        replicates) or does not answer: tells whether clients still write to it."""
        try:
            with redis.Redis(port=server.port, password=self.password, socket_timeout=1) as raw:
                if raw.info("replication")["role"] != "master":
                    return None
                stats = raw.info("commandstats")
        except redis.RedisError:
            return None
        return sum(
            int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
            for name in ("set", "evalsha", "eval", "del")
        )

    def failover(self, timeout: float = 20.0) -> None:
        """``SENTINEL FAILOVER`` on the first sentinel, retried while it has no replica ready
        (``NOGOODSLAVE``) or a failover is in progress."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._sentinel_client(self.sentinels[0]) as client:
                    client.execute_command("SENTINEL FAILOVER", self.service)
                return
            except redis.ResponseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @asynccontextmanager
    async def switch_master(self) -> AsyncIterator[asyncio.Future[tuple[float, int]]]:
        """Subscribed to ``+switch-master`` on every sentinel; the future resolves, at the
        first announcement, to (``loop.time()`` it was seen, the new master's port)."""
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[tuple[float, int]] = loop.create_future()
        clients = [
            aioredis.Redis(port=s.port, password=self.sentinel_password)
            for s in self.sentinels
            if s.running
        ]
        channels = [client.pubsub() for client in clients]
        for channel in channels:
            await channel.subscribe("+switch-master")

        async def listen(channel: PubSub) -> None:
            while not seen.done():
                message = await channel.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None and not seen.done():
                    # "<service> <old ip> <old port> <new ip> <new port>"
                    fields = message["data"].split()
                    if fields[0].decode() == self.service:
                        seen.set_result((loop.time(), int(fields[4])))

        readers = [asyncio.create_task(listen(c)) for c in channels]
        try:
            yield seen
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.wait(readers)
            for channel in channels:
                await channel.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            for client in clients:
                await client.aclose()

    def stop(self) -> None:
        for server in (*self.sentinels, *self.servers):
            server.kill()

    def __enter__(self) -> SentinelGroup:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
