"""The inspections store: each image inspected, once, in SQLite (a file beside the model) or PostgreSQL (a URL that
several stations share), through SQLAlchemy, its schema made and moved on by Alembic's migrations at open.

A hot-folder file is recorded once whatever the crashes: its row carries ``(station, source_key)`` (the file's
name and content digest) under a unique constraint, so a second writer of the same file gets the first row back.
The rows are also the MQTT outbox: ``published_at`` stays empty until the broker acknowledged the message.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from filelock import FileLock
from sqlalchemy import create_engine, event, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from ..errors import AnomatuneError
from .settings import StoreSettings
from .tables import Feedback, Inspection

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
DATABASE = "inspections.sqlite"  # the default store's file, in the model's folder
MIGRATION_LOCK = 0x616E6F6D  # PostgreSQL advisory lock: two stations starting at once migrate one after the other
COLUMNS = tuple(column.name for column in Inspection.__table__.columns)
FEEDBACK_COLUMNS = tuple(column.name for column in Feedback.__table__.columns)
JSONL_FIELDS = {"result_id": "inspection_id", "file": "file_name", "normalized_score": "normalized", "model": "model_id"}
OPERATOR_VERDICTS = ("good", "defect", "none")  # none: the operator took a verdict back


def store_url(value: str | Path) -> str:
    """A database URL from a URL (``postgresql+psycopg://user:pass@host/db``, ``sqlite:///file``) or a file path."""
    text = str(value)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def now() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite gives times back without their zone: they were written in UTC."""
    if moment is None:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _row(inspection: Inspection | Feedback) -> dict[str, Any]:
    out = {column.name: getattr(inspection, column.name) for column in inspection.__table__.columns}
    for name in ("time", "operator_time", "published_at"):
        if name in out:
            moment = _aware(out[name])
            out[name] = None if moment is None else moment.isoformat()
    return out


def _sqlite_pragmas(connection, _record) -> None:
    """WAL: readers (the page, a dashboard) never block the writer; several processes may share the file."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class InspectionStore:
    """The inspections of a line in one database (``url``: a URL or an SQLite file path); ``station`` names the
    writer (default: the host name), so several stations can share one history."""

    def __init__(self, url: str | Path, station: str | None = None):
        self.url = store_url(url)
        self.station = station or socket.gethostname()
        sqlite = self.url.startswith("sqlite")
        try:
            self.engine = create_engine(self.url, connect_args={"timeout": 30} if sqlite else {}, pool_pre_ping=True)
        except Exception as exc:  # an unknown dialect or a driver that is not installed
            raise AnomatuneError(f"--store {self.url!r}: {exc}") from exc
        database = self.engine.url.database if sqlite else None
        self.sqlite_file = Path(database) if database and database != ":memory:" else None  # None: a server, or memory
        if self.sqlite_file is not None:
            self.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.migrate()

    def __repr__(self) -> str:
        return f"InspectionStore({self.engine.url.render_as_string(hide_password=True)!r}, station={self.station!r})"

    @classmethod
    def chosen(cls, settings: StoreSettings | None, model_folder: str | Path) -> InspectionStore:
        """The store ``settings`` names, else the default one: an SQLite file in the model's folder."""
        settings = settings or StoreSettings()
        return cls(settings.store or Path(model_folder) / DATABASE, settings.station)

    def migrate(self) -> None:
        """Bring the schema to the newest migration (a new database is created; an older one is moved on)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        # two stations starting at once migrate one after the other: PostgreSQL by an advisory lock, an SQLite file
        # by a lock file beside it (SQLite's DDL does not take the database's write lock at the transaction's start)
        lock = self.sqlite_file and FileLock(f"{self.sqlite_file}.lock")
        with lock or contextlib.nullcontext():
            try:
                with self.engine.begin() as connection:
                    if connection.dialect.name == "postgresql":
                        connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
            except DBAPIError as exc:
                raise AnomatuneError(f"{self!r}: cannot open the inspections database ({exc.orig})") from exc

    def close(self) -> None:
        self.engine.dispose()

    # -- writing -------------------------------------------------------------------------------------

    def add(self, **values: Any) -> tuple[dict[str, Any], bool]:
        """Record an inspection (the columns of :class:`Inspection`; ``id``, ``time`` and ``station`` default); a row
        with the same ``(station, source_key)`` already there is returned instead: ``(row, added)``."""
        values = {"id": uuid.uuid4().hex, "time": now(), "station": self.station} | values
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise AnomatuneError(f"unknown inspection fields: {', '.join(sorted(unknown))}")
        with Session(self.engine) as session:
            session.add(Inspection(**values))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                existing = self.find(values["station"], values.get("source_key"))
                if existing is None:
                    raise
                return existing, False
            return self.get(values["id"]), True

    def set_operator_verdict(self, inspection_id: str, verdict: str, note: str = "") -> dict[str, Any] | None:
        """The operator's verdict on an inspection (``none`` takes it back); None when there is no such inspection."""
        if verdict not in OPERATOR_VERDICTS:
            raise AnomatuneError(f"verdict {verdict!r}: use one of {', '.join(OPERATOR_VERDICTS)}")
        changes = {"operator_verdict": None if verdict == "none" else verdict, "operator_note": note or None}
        with Session(self.engine) as session:
            done = session.execute(
                update(Inspection).where(Inspection.id == inspection_id).values(**changes, operator_time=now())
            )
            session.commit()
        return self.get(inspection_id) if done.rowcount else None

    def mark_published(self, ids: list[str]) -> None:
        """The broker acknowledged these inspections' messages."""
        if ids:
            with Session(self.engine) as session:
                session.execute(update(Inspection).where(Inspection.id.in_(ids)).values(published_at=now()))
                session.commit()

    # -- reading -------------------------------------------------------------------------------------

    def get(self, inspection_id: str) -> dict[str, Any] | None:
        with Session(self.engine) as session:
            row = session.get(Inspection, inspection_id)
            return None if row is None else _row(row)

    def find(self, station: str, source_key: str | None) -> dict[str, Any] | None:
        """The inspection of a source (a hot-folder file) at a station, if it was recorded."""
        if source_key is None:
            return None
        with Session(self.engine) as session:
            query = select(Inspection).where(Inspection.station == station, Inspection.source_key == source_key)
            row = session.scalars(query).first()
            return None if row is None else _row(row)

    def inspections(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        verdict: str | None = None,
        version: str | None = None,
        model: str | None = None,
        station: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The newest inspections first, filtered (``since`` inclusive, ``until`` exclusive)."""
        query = select(Inspection).order_by(Inspection.time.desc(), Inspection.id).limit(limit)
        for column, value in (
            (Inspection.verdict, verdict),
            (Inspection.version, version),
            (Inspection.model, model),
            (Inspection.station, station),
        ):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(Inspection.time >= since)
        if until is not None:
            query = query.where(Inspection.time < until)
        with Session(self.engine) as session:
            return [_row(row) for row in session.scalars(query)]

    def tally(self, since: datetime | None = None, model: str | None = None) -> dict[str, int]:
        """A shift's counts since ``since``: inspected, good, defective (and unknown, failed), and the operator's
        verdicts that confirmed or overturned the tool's."""
        query = select(Inspection.verdict, Inspection.operator_verdict, func.count()).group_by(
            Inspection.verdict, Inspection.operator_verdict
        )
        if since is not None:
            query = query.where(Inspection.time >= since)
        if model is not None:
            query = query.where(Inspection.model == model)
        counts: Counter[str] = Counter()
        with Session(self.engine) as session:
            for verdict, operator, n in session.execute(query):
                counts["inspected"] += n
                counts[verdict] += n
                if operator is not None:
                    counts["confirmed" if operator == verdict else "overturned"] += n
        return {key: counts[key] for key in ("inspected", "good", "defect", "unknown", "failed", "confirmed", "overturned")}

    def unpublished(self, limit: int = 100, station: str | None = None) -> list[dict[str, Any]]:
        """The oldest inspections (of ``station``) whose message the broker has not acknowledged yet."""
        query = select(Inspection).where(Inspection.published_at.is_(None)).order_by(Inspection.time).limit(limit)
        if station is not None:
            query = query.where(Inspection.station == station)
        with Session(self.engine) as session:
            return [_row(row) for row in session.scalars(query)]

    # -- the operators' verdicts ---------------------------------------------------------------------------

    def add_feedback(self, **values: Any) -> bool:
        """Record a verdict (the columns of :class:`Feedback`; ``id`` is the feedback line's); a verdict already
        recorded under that id is left as it is. Returns whether it was added."""
        values = {"time": now(), "station": self.station} | values
        with Session(self.engine) as session:
            session.add(Feedback(**{k: v for k, v in values.items() if k in FEEDBACK_COLUMNS}))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                return False
            return True

    def import_feedback(self, records: list[dict[str, Any]], model: str) -> int:
        """The lines of a model's ``feedback.jsonl`` not recorded yet (by line id), in their order; returns how many
        were added. Lines of one second keep their order (a microsecond apart)."""
        with Session(self.engine) as session:
            known = set(session.scalars(select(Feedback.id).where(Feedback.model == model)))
        added = 0
        for index, record in enumerate(records):
            if record["id"] in known:
                continue
            values = {JSONL_FIELDS.get(k, k): v for k, v in record.items()}
            moment = datetime.fromisoformat(values["time"]) if values.get("time") else now()
            values["time"] = _aware(moment) + timedelta(microseconds=index)
            added += self.add_feedback(**values, model=model)
        return added

    def verdicts(self, model: str) -> list[dict[str, Any]]:
        """The last verdict on each part of ``model`` (a withdrawn one dropped), oldest first: what an update learns,
        whichever station gave it."""
        query = select(Feedback).where(Feedback.model == model).order_by(Feedback.time, Feedback.id)
        last: dict[str, dict[str, Any]] = {}
        with Session(self.engine) as session:
            for row in session.scalars(query):
                last.pop(row.part, None)
                last[row.part] = _row(row)
        return [r for r in last.values() if r["verdict"] in ("good", "defect")]
