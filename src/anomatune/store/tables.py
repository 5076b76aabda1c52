"""The database's tables (SQLAlchemy 2 declarative): what the migrations create, and what the store reads and writes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Inspection(Base):
    """One image inspected: where it came from, the version that scored it, its scores and verdict, the operator's
    verdict when given, where its image and overlay are kept, and when its message left (the MQTT outbox)."""

    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    station: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(16))  # watch | api
    source_key: Mapped[str | None] = mapped_column(String(300))  # a hot-folder file once: its name and content digest
    model: Mapped[str] = mapped_column(String(256))
    version: Mapped[str | None] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(String(400))
    file_name: Mapped[str] = mapped_column(String(1024))
    score: Mapped[float | None] = mapped_column(Float)
    normalized: Mapped[float | None] = mapped_column(Float)
    false_alarm_rate: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String(16))  # good | defect | unknown (no threshold) | failed
    error: Mapped[str | None] = mapped_column(Text)
    image_path: Mapped[str | None] = mapped_column(Text)
    overlay_path: Mapped[str | None] = mapped_column(Text)
    operator_verdict: Mapped[str | None] = mapped_column(String(16))
    operator_note: Mapped[str | None] = mapped_column(Text)
    operator_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("station", "source_key", name="uq_inspections_station_source_key"),
        Index("ix_inspections_unpublished", "published_at", "time"),
    )


class Feedback(Base):
    """One verdict of an operator on a part (the SHA-256 of its image): what ``anomatune update --feedback`` learns
    (the last verdict on each part). The image and mask files stay in the model's ``feedback/`` folder; the
    append-only ``feedback.jsonl`` there is imported once (rows keep its line ids)."""

    __tablename__ = "feedback"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    station: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(256))
    version: Mapped[str | None] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(String(400))
    part: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))  # good | defect | none (taken back)
    note: Mapped[str | None] = mapped_column(Text)
    file_name: Mapped[str | None] = mapped_column(String(1024))
    inspection_id: Mapped[str | None] = mapped_column(String(32))
    score: Mapped[float | None] = mapped_column(Float)
    normalized: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    decision: Mapped[str | None] = mapped_column(String(16))
    image: Mapped[str | None] = mapped_column(Text)  # relative to the model's feedback folder
    mask: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_feedback_model_time", "model", "time"),)
