"""Outages of the dependencies (a database, the file store), told apart from failures of the model
backend and of the batch itself, and the gate that pauses work while one lasts.

    is_dependency_outage   whether an exception means a database or the file store did not answer:
                           a driver's connection error anywhere in its chain (the provider's store,
                           the stack's registry, inference store or kvstore), an OS error a driver
                           raised (a refused connect), or an OS error of a store (read-only, full,
                           unreachable); never an error of the model backend
    StoreStalled           a store call that has not answered for STALLED_AFTER_SECONDS: a network
                           partition looks like this, not like an error, until TCP gives up
    DependencyGate         one per process: closed while a dependency fails, so that requests and
                           result writes wait instead of failing; reopened for a probe after a pause
                           that doubles up to MAX_PAUSE_SECONDS, and for good on the first success

An outage is a pause, never a failure: a request that met one is sent again once the gate opens,
without using one of its attempts or shrinking its model's capacity, and no result line is written
for it. What bounds the pause is the batch's deadline, a server stop, or a lost lease.
"""

import asyncio
import errno
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai

from ..stack import get_logger

logger = get_logger(name=__name__, category="providers")

# The root packages of database drivers and of the layers over them (SQLAlchemy wraps the driver's
# error in its own, with the driver's as __cause__).
DATABASE_PACKAGES = frozenset({"psycopg2", "psycopg", "asyncpg", "sqlalchemy", "sqlite3", "aiosqlite", "redis"})
# Their error classes that mean the connection or the server, not the statement: a unique violation
# or a syntax error is a bug or a conflict, and pausing would not cure it.
CONNECTION_ERROR_NAMES = frozenset(
    {
        "OperationalError",  # psycopg2, sqlite3 ("database is locked"), SQLAlchemy
        "InterfaceError",  # psycopg2 "cursor already closed", "connection already closed"
        "DisconnectionError",
        "PostgresConnectionError",  # asyncpg: CannotConnectNowError, ConnectionDoesNotExistError, ...
        "ConnectionDoesNotExistError",
        "InternalClientError",
        "AdminShutdown",  # psycopg2.errors: "terminating connection due to administrator command"
        "CannotConnectNow",
        # asyncpg's server states that end or refuse connections; SQLAlchemy wraps them in its generic
        # DBAPIError ("the database system is not yet accepting connections" while it recovers).
        "CannotConnectNowError",
        "AdminShutdownError",
        "CrashShutdownError",
        "TooManyConnectionsError",
        "ConnectionError",  # redis
        "TimeoutError",  # redis, SQLAlchemy's pool
        "BusyLoadingError",
    }
)
# OS errors that say a store cannot be written or reached, whoever raised them.
STORE_ERRNOS = frozenset(
    {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.EACCES, errno.EPERM, errno.ENOTCONN}
)
MAX_CHAIN = 16  # exceptions followed through __cause__ and __context__

STALLED_AFTER_SECONDS = 3.0  # a lease renewal is a one-row update: this long means no answer
INITIAL_PAUSE_SECONDS = 0.25
MAX_PAUSE_SECONDS = 2.0  # how long a recovered dependency waits, at most, to be tried again


class StoreStalled(Exception):
    """A store call has not answered in time (a partition drops packets: no error comes for minutes)."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < MAX_CHAIN:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# Words of an OperationalError that point at the statement or the schema, not the connection.
NOT_AN_OUTAGE = ("no such table", "no such column", "syntax error", "has no column")


def _is_driver_connection_error(exc: BaseException) -> bool:
    for cls in type(exc).__mro__:
        if cls.__module__.split(".")[0] in DATABASE_PACKAGES and cls.__name__ in CONNECTION_ERROR_NAMES:
            return not any(words in str(exc).lower() for words in NOT_AN_OUTAGE)
    return False


def _raised_by_a_driver(exc: BaseException) -> bool:
    """Whether a database driver raised `exc` (asyncpg's refused connect is a plain ConnectionRefusedError)."""
    traceback = exc.__traceback__
    while traceback is not None:
        module = str(traceback.tb_frame.f_globals.get("__name__", ""))
        if module.split(".")[0] in DATABASE_PACKAGES:
            return True
        traceback = traceback.tb_next
    return False


def is_dependency_outage(exc: BaseException) -> bool:
    """Whether `exc` says a database or the file store failed to answer, rather than the model backend
    or the request itself."""
    if isinstance(exc, openai.APIError):  # the model backend answered, or could not be reached
        return False
    for link in _chain(exc):
        if isinstance(link, StoreStalled) or _is_driver_connection_error(link):
            return True
        if isinstance(link, OSError) and (link.errno in STORE_ERRNOS or _raised_by_a_driver(link)):
            return True
    return False


def log_failure(log: Any, message: str, exc: BaseException, **fields: Any) -> None:
    """Log a failure from inside its `except` block: an outage as one line, anything else with its
    traceback. During an outage every background task fails at once, and each rendered traceback
    held the serving loop for about two seconds on a busy machine."""
    if is_dependency_outage(exc):
        log.warning(message, error=f"{type(exc).__name__}: {exc}"[:300], **fields)
    else:
        log.exception(message, **fields)


class DependencyGate:
    """Open while the dependencies answer. `trip` closes it after an outage; `wait_open` waits until
    it is time to try again (a probe); `recovered` opens it for good."""

    def __init__(
        self,
        initial_pause: float = INITIAL_PAUSE_SECONDS,
        max_pause: float = MAX_PAUSE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._initial_pause = initial_pause
        self._max_pause = max_pause
        self._clock = clock
        self._reopens_at = 0.0
        self._pause = initial_pause
        self._outage_started: float | None = None
        self.outages = 0  # since the process started: for tests and metrics

    @property
    def is_open(self) -> bool:
        return self._clock() >= self._reopens_at

    def trip(self, exc: BaseException) -> None:
        """A dependency failed: keep work waiting for a pause that doubles with each failed probe."""
        now = self._clock()
        if self._outage_started is None:
            self._outage_started = now
            self.outages += 1
            error = f"{type(exc).__name__}: {exc}"[:300]
            logger.warning("A dependency does not answer; batch work pauses", error=error)
        if now >= self._reopens_at:  # the first failure of this probe: the next pause is longer
            self._reopens_at = now + self._pause
            self._pause = min(self._max_pause, self._pause * 2)

    def recovered(self) -> None:
        """A call went through: the outage, if there was one, is over."""
        if self._outage_started is not None:
            lasted = self._clock() - self._outage_started
            logger.info("The dependencies answer again; batch work resumes", paused_seconds=round(lasted, 1))
            self._outage_started = None
        self._reopens_at = 0.0
        self._pause = self._initial_pause

    async def wait_open(self) -> None:
        """Return once the gate is open (at once, unless an outage is on)."""
        while (left := self._reopens_at - self._clock()) > 0:
            await asyncio.sleep(left)
