import asyncio
import errno
import sqlite3

import asyncpg
import httpx
import openai
import psycopg2
import psycopg2.errors
import pytest
import sqlalchemy.exc
from hypothesis import given
from hypothesis import strategies as st

from llama_stack_provider_batches.domain.outages import (
    MAX_PAUSE_SECONDS,
    DependencyGate,
    StoreStalled,
    is_dependency_outage,
    log_failure,
)
from tools.harness import free_port

REQUEST = httpx.Request("POST", "http://127.0.0.1:8000/v1/chat/completions")


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


OUTAGES = {
    # The stack's PostgreSQL kvstore after the server restarted (its one connection is gone).
    "psycopg2 cursor closed": psycopg2.InterfaceError("cursor already closed"),
    "psycopg2 server gone": psycopg2.OperationalError("server closed the connection unexpectedly"),
    "psycopg2 admin shutdown": psycopg2.errors.AdminShutdown("terminating connection due to administrator command"),
    # The provider's store through SQLAlchemy and asyncpg.
    "sqlalchemy over asyncpg": raised_from(
        sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("x")),
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
    ),
    "sqlalchemy's generic error over asyncpg, recovering": raised_from(
        sqlalchemy.exc.DBAPIError("SELECT 1", {}, Exception("x")),
        asyncpg.exceptions.CannotConnectNowError("the database system is not yet accepting connections"),
    ),
    "asyncpg connection gone": asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
    "sqlite locked": sqlite3.OperationalError("database is locked"),
    # The file store.
    "read-only directory": OSError(errno.EROFS, "Read-only file system"),
    "no permission": PermissionError(errno.EACCES, "Permission denied"),
    "disk full": OSError(errno.ENOSPC, "No space left on device"),
    # A store call across a partition: no error, no answer.
    "stalled": StoreStalled("a lease renewal has not answered in 3 s"),
    # Wrapped by a layer that does not keep the type.
    "wrapped": raised_from(RuntimeError("registry lookup failed"), psycopg2.InterfaceError("cursor already closed")),
}

NOT_OUTAGES = {
    "backend unreachable": openai.APIConnectionError(request=REQUEST),
    "backend unreachable, refused below": raised_from(
        openai.APIConnectionError(request=REQUEST), ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    ),
    "backend timeout": openai.APITimeoutError(request=REQUEST),
    "backend 503": openai.InternalServerError(
        "busy", response=httpx.Response(503, request=REQUEST), body={"error": {"message": "busy"}}
    ),
    "invalid request": ValueError("temperature must be below 2"),
    "a bug": KeyError("model"),
    "a duplicate key": psycopg2.IntegrityError("duplicate key value violates unique constraint"),
    "a missing table": sqlite3.OperationalError("no such table: batches"),
    "a plain timeout": TimeoutError(),
}


@pytest.mark.parametrize("exc", OUTAGES.values(), ids=OUTAGES.keys())
def test_a_dependency_that_does_not_answer_is_an_outage(exc: BaseException) -> None:
    assert is_dependency_outage(exc)


@pytest.mark.parametrize("exc", NOT_OUTAGES.values(), ids=NOT_OUTAGES.keys())
def test_the_backend_the_request_and_bugs_are_not_outages(exc: BaseException) -> None:
    assert not is_dependency_outage(exc)


@given(st.sampled_from(sorted(OUTAGES)), st.integers(min_value=0, max_value=5))
def test_an_outage_stays_one_however_deeply_it_is_wrapped(name: str, depth: int) -> None:
    exc = OUTAGES[name]
    for level in range(depth):
        exc = raised_from(RuntimeError(f"level {level}"), exc)
    assert is_dependency_outage(exc)


@given(st.integers(min_value=400, max_value=599), st.sampled_from(sorted(OUTAGES)))
def test_an_answer_of_the_backend_is_never_an_outage_whatever_lies_below(status: int, name: str) -> None:
    response = httpx.Response(status, request=REQUEST)
    exc = raised_from(openai.APIStatusError("no", response=response, body=None), OUTAGES[name])
    assert not is_dependency_outage(exc)


def test_a_chain_that_loops_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert not is_dependency_outage(first)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_pauses_longer_while_probes_fail_and_opens_on_a_success() -> None:
    clock = Clock()
    gate = DependencyGate(initial_pause=0.25, clock=clock)
    assert gate.is_open
    gate.trip(OSError(errno.EROFS, "ro"))
    gate.trip(OSError(errno.EROFS, "ro"))  # the same probe failing twice pauses once
    assert not gate.is_open
    pauses = []
    for _ in range(6):
        opened_at = clock.now
        while not gate.is_open:
            clock.now += 1 / 64  # exact in binary: the pauses come out exact
        pauses.append(round(clock.now - opened_at, 2))
        gate.trip(OSError(errno.EROFS, "ro"))
    assert pauses[:3] == [0.25, 0.5, 1.0]
    assert max(pauses) == MAX_PAUSE_SECONDS  # bounded: a returning dependency is seen within it
    gate.recovered()
    assert gate.is_open and gate.outages == 1
    gate.trip(OSError(errno.EROFS, "ro"))
    assert gate.outages == 2
    clock.now += 0.25
    assert gate.is_open  # a new outage starts again from the shortest pause


async def test_waiting_at_an_open_gate_returns_at_once_and_at_a_closed_one_after_the_pause() -> None:
    gate = DependencyGate(initial_pause=0.05)
    await asyncio.wait_for(gate.wait_open(), 0.01)
    gate.trip(OSError(errno.EIO, "io"))
    started = asyncio.get_running_loop().time()
    await gate.wait_open()
    assert asyncio.get_running_loop().time() - started >= 0.04


async def test_a_refused_connect_to_the_database_is_an_outage_and_one_to_anything_else_is_not() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(OSError) as refused_by_driver:
        await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="test", timeout=5)
    assert is_dependency_outage(refused_by_driver.value)
    with pytest.raises(OSError) as refused_elsewhere:
        await asyncio.open_connection("127.0.0.1", port)
    assert not is_dependency_outage(refused_elsewhere.value)


class RecordingLogger:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, object]]] = []

    def warning(self, message: str, **fields: object) -> None:
        self.calls.append(("warning", message, fields))

    def exception(self, message: str, **fields: object) -> None:
        self.calls.append(("exception", message, fields))


def test_an_outage_is_logged_in_one_line_and_anything_else_with_its_traceback() -> None:
    log = RecordingLogger()
    log_failure(log, "Cannot claim batches", OUTAGES["psycopg2 cursor closed"], retry_in=0.5)
    log_failure(log, "Cannot claim batches", KeyError("model"), retry_in=0.5)
    assert log.calls == [
        ("warning", "Cannot claim batches", {"error": "InterfaceError: cursor already closed", "retry_in": 0.5}),
        ("exception", "Cannot claim batches", {"retry_in": 0.5}),
    ]
