"""What predict scores: files, folders, glob patterns and CSV/Parquet manifests, in the order given."""

import pytest

from anomatune.data.sources import expand_sources
from anomatune.errors import DataError

from ..conftest import save_image


@pytest.fixture
def parts(tmp_path):
    for name in ("a.png", "b.jpg", "sub/c.png", "sub/notes.txt"):
        if name.endswith("txt"):
            (tmp_path / "parts" / name).write_text("x")
        else:
            save_image(tmp_path / "parts" / name)
    return tmp_path / "parts"


def test_folders_patterns_and_files_in_order(parts):
    assert [p.name for p in expand_sources([parts])] == ["a.png", "b.jpg", "c.png"]
    assert [p.name for p in expand_sources([f"{parts}/**/*.png"])] == ["a.png", "c.png"]
    assert [p.name for p in expand_sources([parts / "b.jpg", parts / "a.png"])] == ["b.jpg", "a.png"]


def test_manifests_with_relative_and_missing_paths(parts, tmp_path):
    csv_manifest = parts / "list.csv"
    csv_manifest.write_text("camera,path\n1,a.png\n2,sub/c.png\n3,gone.png\n")
    assert expand_sources([csv_manifest]) == [
        parts / "a.png",
        parts / "sub" / "c.png",
        parts / "gone.png",
    ]  # scored later: an error row
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(parts / "b.jpg")], "line": [4]}), tmp_path / "list.parquet")
    assert expand_sources([tmp_path / "list.parquet"]) == [parts / "b.jpg"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("file\nx.png\n", "needs a 'path' column"),
        ("path\n", "lists no images"),
        ("path\na.png\n\n,\n", "has an empty 'path'"),
    ],
)
def test_bad_manifests_are_one_line(parts, content, message):
    manifest = parts / "bad.csv"
    manifest.write_text(content)
    with pytest.raises(DataError, match=message):
        expand_sources([manifest])


def test_nothing_to_score_is_said_up_front(parts, tmp_path):
    with pytest.raises(DataError, match="does not exist: pass image files, folders, glob patterns"):
        expand_sources([tmp_path / "nowhere"])
    with pytest.raises(DataError, match="matches no images"):
        expand_sources([f"{parts}/*.bmp"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        expand_sources([tmp_path / "empty"])
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a Parquet manifest"):
        expand_sources([tmp_path / "x.parquet"])
