"""Where the inspections are kept and under which station's name (torch-free: read by the command line)."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import Settings, setting


@dataclass(frozen=True)
class StoreSettings(Settings):
    section = "store"
    store: str | None = setting(
        None,
        "Database of the inspections: an SQLite file or a URL (postgresql+psycopg://user:password@host/db, several "
        "stations sharing one history); default: inspections.sqlite in the model's folder.",
        metavar="URL",
    )
    station: str | None = setting(None, "This station's name in the store and the messages; default: the host name.")
