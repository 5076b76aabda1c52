"""The inspections store: each inspection once, the shift's tally, filters, migrations, several writers."""

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from anomatune.errors import AnomatuneError
from anomatune.store import InspectionStore


def _add(store, key=None, verdict="good", **values):
    return store.add(source="watch", source_key=key, model="m", file_name=f"{key}.png", verdict=verdict, **values)


def test_a_source_is_recorded_once_and_the_tally_counts_the_operators_verdicts(tmp_path):
    store = InspectionStore(tmp_path / "i.sqlite", station="s1")
    first, added = _add(store, "a", score=1.5)
    again, added_again = _add(store, "a", score=9.0)
    assert added and not added_again and again["id"] == first["id"] and again["score"] == 1.5
    _add(store, "b", verdict="defect")
    _add(store, "c", verdict="defect")
    _add(store, "d", verdict="failed", error="truncated")
    store.set_operator_verdict(first["id"], "good")  # confirmed
    defect = store.inspections(verdict="defect")[0]
    store.set_operator_verdict(defect["id"], "good")  # overturned
    assert store.tally() == {"inspected": 4, "good": 1, "defect": 2, "unknown": 0, "failed": 1, "confirmed": 1, "overturned": 1}
    store.set_operator_verdict(defect["id"], "none")  # taken back
    assert store.tally()["overturned"] == 0
    assert store.set_operator_verdict("nope", "good") is None
    with pytest.raises(AnomatuneError, match="use one of good, defect, none"):
        store.set_operator_verdict(first["id"], "bad")
    with pytest.raises(AnomatuneError, match="unknown inspection fields: colour"):
        _add(store, "e", colour="red")


def test_filters_newest_first_and_a_reopened_store_keeps_everything(tmp_path):
    store = InspectionStore(tmp_path / "i.sqlite", station="s1")
    start = datetime(2026, 1, 1, 6, tzinfo=UTC)
    for hour in range(5):
        _add(store, f"k{hour}", time=start + timedelta(hours=hour), version=f"v{1 + hour % 2}")
    rows = store.inspections(since=start + timedelta(hours=1), until=start + timedelta(hours=4), version="v2")
    assert [r["source_key"] for r in rows] == ["k3", "k1"]
    assert rows[0]["time"] == "2026-01-01T09:00:00+00:00"
    assert store.tally(since=start + timedelta(hours=3))["inspected"] == 2
    assert len(InspectionStore(tmp_path / "i.sqlite").inspections(limit=3)) == 3


def test_the_outbox_is_per_station(tmp_path):
    one, two = InspectionStore(tmp_path / "i.sqlite", station="one"), InspectionStore(tmp_path / "i.sqlite", station="two")
    _add(one, "a"), _add(two, "a"), _add(two, "b")  # the same file name at two stations: two inspections
    assert [r["station"] for r in one.unpublished(station="one")] == ["one"]
    one.mark_published([r["id"] for r in one.unpublished(station="one")])
    assert one.unpublished(station="one") == [] and len(two.unpublished(station="two")) == 2


def test_an_unknown_database_is_one_line(tmp_path):
    with pytest.raises(AnomatuneError, match="--store 'nosuchdb://x'"):
        InspectionStore("nosuchdb://x")


WRITER = """
import sys
from anomatune.store import InspectionStore
store = InspectionStore(sys.argv[1], station=sys.argv[2])
for i in range(int(sys.argv[3])):
    store.add(source="api", model="m", file_name=f"{i}.png", verdict="good")
"""


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_stations_writing_at_once_lose_no_row(database, tmp_path, request):
    url = str(tmp_path / "shared.sqlite") if database == "sqlite" else request.getfixturevalue("postgres")
    n = 150
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, station, str(n)], stderr=subprocess.PIPE)
               for station in ("one", "two")]  # fmt: skip
    for writer in writers:
        assert writer.wait(120) == 0, writer.stderr.read().decode()[-2000:]
    store = InspectionStore(url)
    assert store.tally()["inspected"] == 2 * n
    assert store.inspections(limit=1)[0]["time"].endswith("+00:00")  # times come back in UTC, whichever database
    assert {s: len(store.inspections(station=s, limit=1000)) for s in ("one", "two")} == {"one": n, "two": n}
