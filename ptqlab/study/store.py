"""The results store: one SQLite database per study (stdlib ``sqlite3``).

Tables
------
``runs``
    One row per planned run, keyed by ``run_hash`` = ``config_hash`` of the
    canonical run dict (:func:`ptqlab.study.recipe.run_key`), known before the
    run.  Holds the run dict (``spec_json``), its status (``pending`` ->
    ``running`` -> ``done`` | ``failed``), the claim (``worker``, ``host``,
    ``pid``, ``claim_token``, ``heartbeat_at``), and once done the record:
    ``config_json`` (``record["config"]``), ``record_hash``
    (``record["config_hash"]``), ``ppl_json``, ``mean_ppl``,
    ``bits_per_weight``, ``timings_json``, ``versions_json``,
    ``data_sources_json``, ``layers_json``, ``metrics_json`` (the record's
    ``kld``, ``tasks``, ``window_nll`` and ``speed``, the ``--speed``
    figures; a column added to schema 1 in place, databases without it
    read as having none); ``started_at`` /
    ``finished_at`` are Unix times.
``ppl``
    The normalised perplexities: ``(run_hash, dataset, ppl)``.
``meta``
    Schema version.

Concurrency
-----------
Every write is one transaction opened with ``BEGIN IMMEDIATE`` (the write
lock is taken up front), so the claim of the next run -- select a pending
or stale row, mark it running -- is atomic across threads, processes and,
on a filesystem with working POSIX locks, hosts.  A run's results and its
``done`` status are committed together; a process killed at any point loses
at most the run it was computing.  A claim is *stale* when its worker's
heartbeat is older than ``stale_after`` seconds (any host), or at once when
its worker ran on this host and its process is gone.  The journal stays in
SQLite's default rollback mode (WAL does not work over network filesystems).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")
RECORD_METRICS = ("kld", "tasks", "window_nll", "speed")  # what metrics_json keeps of a record

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_hash          TEXT PRIMARY KEY,
    seq               INTEGER NOT NULL,
    kind              TEXT NOT NULL DEFAULT 'quant',
    model             TEXT NOT NULL,
    name              TEXT NOT NULL,
    spec_json         TEXT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'running', 'done', 'failed')),
    worker            TEXT,
    host              TEXT,
    pid               INTEGER,
    claim_token       TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    added_at          REAL NOT NULL,
    started_at        REAL,
    heartbeat_at      REAL,
    finished_at       REAL,
    config_json       TEXT,
    record_hash       TEXT,
    ppl_json          TEXT,
    mean_ppl          REAL,
    bits_per_weight   REAL,
    time_s            REAL,
    timings_json      TEXT,
    versions_json     TEXT,
    data_sources_json TEXT,
    layers_json       TEXT,
    error             TEXT,
    metrics_json      TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, model, seq);
CREATE TABLE IF NOT EXISTS ppl (
    run_hash TEXT NOT NULL REFERENCES runs (run_hash) ON DELETE CASCADE,
    dataset  TEXT NOT NULL,
    ppl      REAL NOT NULL,
    PRIMARY KEY (run_hash, dataset)
);
"""


class StoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class Claim:
    """A run this worker holds: finish, fail or release it with the token."""

    run_hash: str
    token: str
    spec: dict
    name: str
    model: str
    attempts: int


def hostname() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """A study database; safe to open from several threads, processes and hosts at once."""

    def __init__(self, path: str | Path, busy_timeout: float = 120.0, readonly: bool = False) -> None:
        """``readonly``: open an existing study database for reading only (reports): nothing is created or
        written, not even the schema, and a file that is not a study database is an error."""
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.readonly = readonly
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a study database")
        if readonly and not self.path.is_file():
            raise StoreError(f"study database {self.path} does not exist")
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise StoreError(f"{self.path} is not a ptqlab study database (not an SQLite file)")
        elif readonly:
            raise StoreError(f"{self.path} is an empty file, not a ptqlab study database")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._connect()
        try:
            version = self._schema_version()
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise StoreError(f"{self.path} is not a readable study database: {err}") from None
        if readonly:
            if version != SCHEMA_VERSION:
                self._conn.close()
                raise StoreError(f"{self.path} is an SQLite file but not a ptqlab study database"
                                 + (f" of this version (schema {version}, this ptqlab reads {SCHEMA_VERSION})"
                                    if version is not None else " (it has no ptqlab schema)"))
            return
        if version == SCHEMA_VERSION:
            self._add_missing_columns()
        if version != SCHEMA_VERSION:  # only write when the schema is missing
            with self.transaction() as c:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
                row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) != SCHEMA_VERSION:
                    raise StoreError(f"{self.path}: schema version {row[0]}, this ptqlab writes {SCHEMA_VERSION}")

    def _add_missing_columns(self) -> None:
        """Columns added to schema 1 after its first release (additive: older ptqlab ignores them)."""
        have = {r[1] for r in self._conn.execute("PRAGMA table_info(runs)").fetchall()}
        if "metrics_json" not in have:
            with self.transaction() as c:
                c.execute("ALTER TABLE runs ADD COLUMN metrics_json TEXT")

    def _schema_version(self) -> int | None:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            return None
        return int(row[0]) if row else None

    def _connect(self) -> sqlite3.Connection:
        # read-only: SQLite's mode=ro URI, so that not even a journal or the schema can be written
        target, uri = (self.path.resolve().as_uri() + "?mode=ro", True) if self.readonly else (self.path, False)
        conn = sqlite3.connect(target, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False,
                               uri=uri)
        conn.row_factory = sqlite3.Row
        if not self.readonly:
            conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception, Ctrl-C included)."""
        c = self._conn
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                c.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        else:
            c.execute("COMMIT")

    # ------------------------------------------------------------ planning

    def add_runs(self, runs, force: bool = False, retry_failed: bool = False) -> dict:
        """Insert planned runs (``PlannedRun``) not yet in the store; returns counts.

        ``force``: runs of this plan that are done or failed go back to pending
        (their old results are deleted); ``retry_failed``: only failed ones do.
        """
        now = time.time()
        added = reset = 0
        with self.transaction() as c:
            seq = c.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0]
            for run in runs:
                seq += 1
                cur = c.execute(
                    "INSERT OR IGNORE INTO runs (run_hash, seq, kind, model, name, spec_json, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (run.key, seq, run.kind, run.model, run.name(), json.dumps(run.spec, sort_keys=True), now),
                )
                if cur.rowcount:
                    added += 1
                    continue
                statuses = ("done", "failed") if force else ("failed",) if retry_failed else ()
                if statuses:
                    cur = c.execute(
                        f"UPDATE runs SET status = 'pending', claim_token = NULL, error = NULL "
                        f"WHERE run_hash = ? AND status IN ({','.join('?' * len(statuses))})",
                        (run.key, *statuses),
                    )
                    if cur.rowcount:
                        c.execute("DELETE FROM ppl WHERE run_hash = ?", (run.key,))
                        reset += 1
        return {"added": added, "reset": reset}

    # ------------------------------------------------------------ claims

    def reclaim_dead(self, host: str | None = None) -> int:
        """Claims of workers of ``host`` (default: this one) whose process is gone go back to pending."""
        host = host or hostname()
        rows = self._conn.execute(
            "SELECT run_hash, pid, claim_token FROM runs WHERE status = 'running' AND host = ?", (host,)
        ).fetchall()
        dead = [r for r in rows if r["pid"] is not None and r["pid"] != os.getpid() and not pid_alive(r["pid"])]
        n = 0
        if dead:
            with self.transaction() as c:
                for r in dead:
                    n += c.execute(
                        "UPDATE runs SET status = 'pending', claim_token = NULL WHERE run_hash = ? AND claim_token = ?",
                        (r["run_hash"], r["claim_token"]),
                    ).rowcount
        return n

    def claim(self, worker: str, prefer_model: str | None = None, stale_after: float = 300.0,
              host: str | None = None, pid: int | None = None) -> Claim | None:
        """Atomically take the next pending (or stale) run; ``None`` when nothing is left to take.

        Runs of ``prefer_model`` come first (the worker has that model loaded),
        then in plan order.
        """
        host, pid = host or hostname(), pid or os.getpid()
        now = time.time()
        token = uuid.uuid4().hex
        with self.transaction() as c:
            row = c.execute(
                "SELECT run_hash, spec_json, name, model, attempts FROM runs "
                "WHERE status = 'pending' OR (status = 'running' AND heartbeat_at < ?) "
                "ORDER BY CASE WHEN model = ? THEN 0 ELSE 1 END, seq LIMIT 1",
                (now - stale_after, prefer_model or ""),
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE runs SET status = 'running', worker = ?, host = ?, pid = ?, claim_token = ?, "
                "attempts = attempts + 1, started_at = ?, heartbeat_at = ?, error = NULL WHERE run_hash = ?",
                (worker, host, pid, token, now, now, row["run_hash"]),
            )
        return Claim(row["run_hash"], token, json.loads(row["spec_json"]), row["name"], row["model"],
                     row["attempts"] + 1)

    def heartbeat(self, claim: Claim) -> bool:
        with self.transaction() as c:
            return bool(c.execute("UPDATE runs SET heartbeat_at = ? WHERE run_hash = ? AND claim_token = ?",
                                  (time.time(), claim.run_hash, claim.token)).rowcount)

    def finish(self, claim: Claim, record: dict) -> bool:
        """Store a run's record and mark it done, in one transaction; ``False`` if the claim was lost."""
        ppl = {k: float(v) for k, v in record["ppl"].items()}
        mean = sum(ppl.values()) / len(ppl) if ppl else None
        timings = {**record.get("timings", {}), "total": record.get("time_s")}
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE runs SET status = 'done', finished_at = ?, heartbeat_at = ?, claim_token = NULL, "
                "config_json = ?, record_hash = ?, ppl_json = ?, mean_ppl = ?, bits_per_weight = ?, time_s = ?, "
                "timings_json = ?, versions_json = ?, data_sources_json = ?, layers_json = ?, metrics_json = ?, "
                "error = NULL WHERE run_hash = ? AND claim_token = ? AND status = 'running'",
                (time.time(), time.time(), json.dumps(record["config"], sort_keys=True), record.get("config_hash"),
                 json.dumps(ppl, sort_keys=True), mean, record.get("bits_per_weight"), record.get("time_s"),
                 json.dumps(timings), json.dumps(record.get("versions", {})),
                 json.dumps(record.get("data_sources", {})), json.dumps(record.get("layers", [])),
                 json.dumps({k: record[k] for k in RECORD_METRICS if k in record}), claim.run_hash, claim.token),
            )
            if not cur.rowcount:
                return False
            c.execute("DELETE FROM ppl WHERE run_hash = ?", (claim.run_hash,))
            c.executemany("INSERT INTO ppl (run_hash, dataset, ppl) VALUES (?, ?, ?)",
                          [(claim.run_hash, d, v) for d, v in sorted(ppl.items())])
        return True

    def fail(self, claim: Claim, error: str) -> bool:
        with self.transaction() as c:
            return bool(c.execute(
                "UPDATE runs SET status = 'failed', finished_at = ?, claim_token = NULL, error = ? "
                "WHERE run_hash = ? AND claim_token = ? AND status = 'running'",
                (time.time(), error, claim.run_hash, claim.token)).rowcount)

    def release(self, claim: Claim) -> bool:
        """Give a claimed run back (interrupted): it goes back to pending."""
        with self.transaction() as c:
            return bool(c.execute(
                "UPDATE runs SET status = 'pending', claim_token = NULL "
                "WHERE run_hash = ? AND claim_token = ? AND status = 'running'",
                (claim.run_hash, claim.token)).rowcount)

    # ------------------------------------------------------------ queries

    def counts(self, keys: list[str] | None = None) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        if keys is None:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        else:
            rows = []
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                rows += self._conn.execute(
                    f"SELECT status, COUNT(*) FROM runs WHERE run_hash IN ({','.join('?' * len(chunk))}) "
                    f"GROUP BY status", chunk).fetchall()
        for status, n in rows:
            out[status] += n
        return out

    def eta_seconds(self) -> float | None:
        """Remaining runs x mean run time / runs in flight (a rough estimate)."""
        c = self._conn
        mean = c.execute("SELECT AVG(finished_at - started_at) FROM runs WHERE status = 'done'").fetchone()[0]
        if mean is None:
            return None
        counts = self.counts()
        remaining = counts["pending"] + counts["running"]
        parallel = max(1, c.execute("SELECT COUNT(DISTINCT worker) FROM runs WHERE status = 'running'").fetchone()[0])
        return remaining * mean / min(parallel, max(remaining, 1))

    def rows(self, kind: str | None = None) -> list[dict]:
        """Every run, decoded (JSON columns parsed), in plan order."""
        query = "SELECT * FROM runs" + (" WHERE kind = ?" if kind else "") + " ORDER BY seq"
        out = []
        for r in self._conn.execute(query, (kind,) if kind else ()).fetchall():
            d = dict(r)
            for col in ("spec", "config", "ppl", "timings", "versions", "data_sources", "layers", "metrics"):
                raw = d.pop(f"{col}_json", None)
                d[col] = json.loads(raw) if raw else None
            out.append(d)
        return out

    def ppl_rows(self) -> list[tuple[str, str, float]]:
        return [tuple(r) for r in self._conn.execute("SELECT run_hash, dataset, ppl FROM ppl ORDER BY run_hash, dataset")]

    def get(self, run_hash: str) -> dict | None:
        for r in self.rows():
            if r["run_hash"] == run_hash:
                return r
        return None

    def pending_by_model(self) -> dict[str, int]:
        """Pending runs per model (the Ray driver spreads its actors over the models with this)."""
        rows = self._conn.execute("SELECT model, COUNT(*) FROM runs WHERE status = 'pending' GROUP BY model")
        return {model: n for model, n in rows.fetchall()}


def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
