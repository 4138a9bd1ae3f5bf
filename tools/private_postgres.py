"""A PostgreSQL server of one's own, for tests and benchmarks that stop and restart the database.

The shared server on 127.0.0.1:5432 serves every test at once: nothing may stop it. This one lives in
a temporary directory, on a port and socket directory of its own, made with the installed server's
`initdb` and run with its `pg_ctl` (`pg_config --bindir` finds them). PostgreSQL refuses to run as
root, so as root the commands run as the `postgres` user.

    with PrivatePostgres() as database:
        env = {"POSTGRES_PORT": str(database.port)}
        database.stop(); database.start()     # an outage, as long as the caller waits between them
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg2

START_SECONDS = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bindir() -> Path:
    return Path(subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True, text=True).stdout.strip())


class PrivatePostgres:
    """A PostgreSQL cluster in a new temporary directory, with trust authentication and a database
    `test`; the directory goes with it. Not under pytest's temporary directories: the `postgres`
    user cannot enter those of root."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="batches-postgres-"))
        self.data = self.directory / "data"
        self.sockets = self.directory / "sockets"
        self.log = self.directory / "postgres.log"
        self.port = _free_port()
        self._bin = _bindir()

    @staticmethod
    def available() -> bool:
        """Whether this machine can run one: the server binaries, and a user PostgreSQL accepts."""
        if shutil.which("pg_config") is None:
            return False
        if not (_bindir() / "initdb").exists():
            return False
        return os.geteuid() != 0 or shutil.which("runuser") is not None

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, cwd="/")

    def create(self) -> None:
        self.sockets.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            for path in (self.data, self.sockets):
                shutil.chown(path, "postgres")
        self._run(str(self._bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, dbname="postgres", user="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE test")
        connection.close()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        deadline = time.monotonic() + START_SECONDS
        while not self.answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} did not start; see {self.log}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop at once, as a crash or a restart does to its clients: their connections are closed."""
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def answers(self) -> bool:
        try:
            psycopg2.connect(host="127.0.0.1", port=self.port, dbname="postgres", user="postgres").close()
        except psycopg2.OperationalError:
            return False
        return True

    def __enter__(self) -> "PrivatePostgres":
        self.create()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.answers():
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
