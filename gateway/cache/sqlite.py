"""The host tier of the token cache: the workers of one gateway (``workers: N``) share tokens,
exchange locks and assertion-ID bindings through one SQLite file, with no external service.

Rules this module owns:

- **Private and short-lived.** The supervisor creates the database (``create_database``) in
  a runtime folder only its user can enter (0700), made for this run and removed at exit;
  nothing in it is worth keeping, so writes skip ``fsync`` (``synchronous=OFF``).
- **Sealed like Redis entries**: ``EntrySealer`` (AES-256-GCM, the row name as associated
  data) under a secret the supervisor draws per run and hands each worker through an
  inherited pipe, so it is never on disk and never in an environment. Row names are the
  hashes Redis uses for key names: neither cache key nor assertion ID is stored in clear. A
  binding's fingerprint (a SHA-256 of what was signed) is kept as is: it reveals no more.
- **WAL mode, tiny statements.** Readers never wait for the writer; every write is one
  statement or one ``BEGIN IMMEDIATE`` transaction of two, so the write lock is held for
  microseconds.
- **Never on the event loop.** Every call runs on the store's own thread (one connection;
  the sqlite3 module releases the GIL while SQLite works) and is bounded by ``timeout``
  (SQLite's busy timeout is half of it). The bound is generous on purpose: SQLite fails
  fast when it fails (a missing file, a full disk), so only a starved worker ever reaches
  it, and a call given up too early costs a second exchange of the same assertion (seen
  with 1 s on an overloaded machine). Measured on a shared 2-core machine: a ``get`` costs
  0.17 ms through the thread against 0.006 ms inline, and a lock taken and released 0.5 ms:
  noise next to the exchange a miss is about to make, while inline one checkpoint or one
  busy wait would stall every request of the worker, hits included. Hits never come here:
  the in-process LRU answers them.
- **A dead store behaves like an empty one**, as with Redis: a failed or slow call is a
  miss, a skipped write, an owned lock, an unrecorded binding; one log line per change of
  state (logger ``gateway.cache.sqlite``).
- **The exchange lock is a row** (name, owner, expiry on the host's monotonic clock, which
  every process shares) taken by one upsert that only replaces an expired row, renewed by
  its owner every ``lock_ttl / 3``, deleted only by its owner. A worker that does not get it
  waits (polling, at most ``lock_wait``) until the row is gone or expired, then yields False:
  when the holder succeeded its entry is already stored, and when it failed the caller goes
  itself at once instead of waiting out a result that will not come. A holder that died
  blocks nobody for longer than ``lock_ttl``.
- Expired rows are pruned by each worker at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from pydantic import SecretStr

from gateway.cache.entry import CachedToken
from gateway.cache.redis.sealing import EntrySealer, digest_name, entry_name, lock_name

logger = logging.getLogger("gateway.cache.sqlite")

DATABASE = "tokens.sqlite3"
# How long a worker whose lock wait ended waits for an entry (see TokenCache shared_wait):
# the holder stores its entry before it releases, so this only covers a holder that is
# still exchanging when ``lock_wait`` ran out.
RESULT_WAIT = 1.0

_T = TypeVar("_T")
_KEY_ID = "run"
_PRUNE_EVERY = 60.0
_POLL_FIRST, _POLL_MAX = 0.01, 0.1
_FAULTS = (sqlite3.Error, OSError, TimeoutError)
_STORE_DOWN: object = object()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    name BLOB PRIMARY KEY, blob BLOB NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tokens_expiry ON tokens (expires_at);
CREATE TABLE IF NOT EXISTS locks (
    name BLOB PRIMARY KEY, owner BLOB NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bindings (
    name BLOB PRIMARY KEY, fingerprint BLOB NOT NULL, until REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bindings_expiry ON bindings (until);
"""
_TAKE_LOCK = """
INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?)
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
WHERE locks.expires_at <= ?
"""


def create_database(folder: Path) -> Path:
    """Create the empty shared database in ``folder`` (WAL mode is a property of the file);
    the supervisor does it once, before any worker opens it."""
    path = folder / DATABASE
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
    path.chmod(0o600)
    return path


def new_secret() -> str:
    """A fresh sealing secret for one run (256 bits)."""
    return secrets.token_urlsafe(32)


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, the write lock taken at the start (no upgrade deadlock)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # never leave the connection inside a transaction
            db.execute("ROLLBACK")
        raise


class SqliteTokenStore:
    """``SharedStore`` on a SQLite file shared by the workers of one host (see module doc).

    ``clock`` (monotonic, host-wide) times locks and pruning; ``wall_clock`` is compared
    with ``CachedToken.expires_at`` and binding ends. ``lock_wait`` bounds how long a worker
    waits for another worker's exchange: the longest exchange (the largest
    ``retries.deadline``) plus ``lock_ttl``, as a hold always ends within that.
    """

    def __init__(
        self,
        path: Path,
        secret: str,
        *,
        timeout: float = 5.0,
        lock_ttl: float = 10.0,
        lock_wait: float = 25.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._sealer = EntrySealer({_KEY_ID: SecretStr(secret)}, _KEY_ID)
        self._path = path
        self._timeout = timeout
        self._lock_ttl = lock_ttl
        self._lock_wait = lock_wait
        self._clock = clock
        self._wall = wall_clock
        # One thread owns the connection (sqlite3 connections stay on their thread).
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-token-store")
        self._db: sqlite3.Connection | None = None
        self._prune_at = 0.0
        self._up: bool | None = None
        self._closed = False

    def __repr__(self) -> str:  # the sealer's repr shows no key either
        return f"SqliteTokenStore(path={str(self._path)!r}, healthy={self.healthy})"

    @property
    def healthy(self) -> bool:
        return self._up is True

    async def ping(self) -> bool:
        return bool(await self._call("ping", lambda db: db.execute("SELECT 1").fetchone(), None))

    async def get(self, cache_key: str, assertion_id: str) -> CachedToken | None:
        entry = await self._read("get", entry_name("", cache_key, assertion_id))
        if entry is None or (entry.cache_key, entry.assertion_id) != (cache_key, assertion_id):
            return None
        return entry

    async def find(self, cache_key: str, digest: bytes) -> CachedToken | None:
        entry = await self._read("find", digest_name("", cache_key, digest))
        if entry is None or (entry.cache_key, entry.digest) != (cache_key, digest):
            return None
        return entry

    async def _read(self, op: str, name: bytes) -> CachedToken | None:
        """The live entry sealed under ``name``, or None (absent, expired, not opening)."""
        now = self._wall()
        row = await self._call(
            op,
            lambda db: db.execute(
                "SELECT blob FROM tokens WHERE name = ? AND expires_at > ?", (name, now)
            ).fetchone(),
            None,
        )
        if row is None:
            return None
        entry = self._sealer.open(name, bytes(row[0]))
        return entry if entry is not None and entry.expires_at > self._wall() else None

    async def put(self, entry: CachedToken) -> None:
        if entry.expires_at <= self._wall():
            return
        # As in Redis: under the ID, and a token under its digest too, each sealed for its name.
        names = [entry_name("", entry.cache_key, entry.assertion_id)]
        if entry.digest:
            names.append(digest_name("", entry.cache_key, entry.digest))
        rows = [(name, self._sealer.seal(name, entry), entry.expires_at) for name in names]

        def work(db: sqlite3.Connection) -> None:
            with _immediate(db):
                db.executemany(
                    "INSERT OR REPLACE INTO tokens (name, blob, expires_at) VALUES (?, ?, ?)", rows
                )
            self._prune(db)

        await self._call("put", work, None)

    async def delete(self, cache_key: str, assertion_id: str, digest: bytes = b"") -> None:
        names = [(entry_name("", cache_key, assertion_id),)]
        if digest:
            names.append((digest_name("", cache_key, digest),))
        await self._call(
            "delete", lambda db: db.executemany("DELETE FROM tokens WHERE name = ?", names), None
        )

    async def bind_id(
        self, cache_key: str, assertion_id: str, fingerprint: bytes, until: float
    ) -> bytes | None:
        """See ``SharedStore.bind_id``."""
        if until <= self._wall():
            return None  # nothing left to bind: the assertion is no longer accepted
        name = entry_name("", cache_key, assertion_id)

        def work(db: sqlite3.Connection) -> bytes | None:
            with _immediate(db):
                row = db.execute(
                    "SELECT fingerprint FROM bindings WHERE name = ? AND until > ?",
                    (name, self._wall()),
                ).fetchone()
                if row is not None:
                    return bytes(row[0])
                db.execute(
                    "INSERT OR REPLACE INTO bindings (name, fingerprint, until) VALUES (?, ?, ?)",
                    (name, fingerprint, until),
                )
                return None

        return await self._call("bind", work, None)

    @contextlib.asynccontextmanager
    async def exchange_lock(self, cache_key: str, assertion_id: str) -> AsyncIterator[bool]:
        """Yields True when this worker owns the exchange (or the store is down); False once
        another worker's hold ended or ``lock_wait`` ran out (see the module doc)."""
        name = lock_name("", cache_key, assertion_id)
        owner = secrets.token_bytes(16)

        def take(db: sqlite3.Connection) -> bool:
            now = self._clock()
            return db.execute(_TAKE_LOCK, (name, owner, now + self._lock_ttl, now)).rowcount == 1

        acquired = await self._call("lock", take, _STORE_DOWN)
        if acquired is _STORE_DOWN:
            yield True  # nobody can deliver through a dead store: go ourselves
            return
        if not acquired:
            await self._wait_for_release(name)
            yield False
            return
        renewal = asyncio.create_task(self._keep_lock(name, owner), name="sqlite-lock-renewal")
        try:
            yield True
        finally:
            renewal.cancel()
            await asyncio.wait([renewal])  # neither raises its CancelledError nor eats ours
            await self._call(
                "unlock",
                lambda db: db.execute(
                    "DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner)
                ),
                None,
            )

    async def _wait_for_release(self, name: bytes) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_wait
        pause = _POLL_FIRST

        def held(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM locks WHERE name = ? AND expires_at > ?", (name, self._clock())
            ).fetchone()
            return row is not None

        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(pause, left))
            if not await self._call("lock wait", held, False):
                return
            pause = min(pause * 2, _POLL_MAX)

    async def _keep_lock(self, name: bytes, owner: bytes) -> None:
        def renew(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE locks SET expires_at = ? WHERE name = ? AND owner = ?",
                (self._clock() + self._lock_ttl, name, owner),
            )
            return cursor.rowcount == 1

        while True:
            await asyncio.sleep(self._lock_ttl / 3)
            if await self._call("lock renewal", renew, True) is False:
                # expired and possibly taken by another worker: at worst two exchanges
                logger.info("exchange lock lost before the exchange finished")
                return

    async def close(self) -> None:
        def shut(_db: sqlite3.Connection | None) -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(*_FAULTS):
            async with asyncio.timeout(self._timeout):
                await loop.run_in_executor(self._thread, shut, None)
        self._thread.shutdown(wait=False)

    # --- on the store's thread --------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            # mode=rw: a missing database is a fault, never a new empty file somewhere
            uri = self._path.resolve().as_uri() + "?mode=rw"
            db = sqlite3.connect(uri, uri=True, timeout=self._timeout / 2, isolation_level=None)
            db.execute("PRAGMA synchronous=OFF")
            self._db = db
        return self._db

    def _prune(self, db: sqlite3.Connection) -> None:
        now = self._clock()
        if now < self._prune_at:
            return
        self._prune_at = now + _PRUNE_EVERY
        wall = self._wall()
        db.execute("DELETE FROM tokens WHERE expires_at <= ?", (wall,))
        db.execute("DELETE FROM bindings WHERE until <= ?", (wall,))
        db.execute("DELETE FROM locks WHERE expires_at <= ?", (now,))

    # --- fault handling ----------------------------------------------------------------------

    async def _call(self, op: str, work: Callable[[sqlite3.Connection], _T], default: _T) -> _T:
        if self._closed:  # e.g. a lock renewal still running at shutdown
            return default
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                result = await loop.run_in_executor(self._thread, lambda: work(self._connection()))
        except _FAULTS as exc:
            if self._up is not False:
                kind = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
                self._up = False
                logger.warning("host token store is down (%s: %s); serving without it", op, kind)
            return default
        if self._up is not True:
            if self._up is False:
                logger.info("host token store is up")
            self._up = True
        return result
