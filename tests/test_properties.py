"""Property-based tests (hypothesis): whatever text reaches the settings and whatever bytes reach the server,
the answer is a value or one line of ours, never a traceback, and an image's memory is bounded before decoding."""

import io
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomatune.apps import options
from anomatune.data.settings import DataSettings
from anomatune.errors import SettingsError
from anomatune.finetune.settings import FinetuneSettings
from anomatune.pipeline.settings import PipelineSettings, RuntimeSettings
from anomatune.schema import flat_settings

from .conftest import png_header

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the headers are bombs on purpose

GROUPS = [PipelineSettings, FinetuneSettings, DataSettings, RuntimeSettings]
KEYS = [(cls, flat.key) for cls in GROUPS for flat in flat_settings(cls)]
TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "-1", "0", "1e309", "nan", "inf", "none", "true", "3x", "256x", "0x0", "1,2", "[1, 2]", "{a: 1}"]),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True).map(str),
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(KEYS), TEXT)
def test_any_text_for_any_setting_is_a_value_or_one_line(key, text):
    cls, name = key
    try:
        options.build(cls, {name: text})
    except SettingsError as exc:
        assert "\n" not in str(exc) and str(exc)


@pytest.fixture(scope="module")
def limits():
    pytest.importorskip("fastapi", reason="the serve extra (anomatune[serve]) is not installed; make test installs it")
    from anomatune.serve.settings import ServeSettings

    return ServeSettings(max_side=20000), 10_000_000


def _upload(data: bytes, limits):
    """What the server does with one uploaded file before scoring it: its header, then the decoded image."""
    from anomatune.serve.app import ApiError, decode, image_size

    serve_settings, max_pixels = limits
    stream = io.BytesIO(data)
    try:
        image_size(stream, "f.png", len(data), serve_settings, max_pixels)
        return decode(stream, "f.png", max_pixels)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and "\n" not in str(exc) and str(exc).startswith("f.png")
        return exc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000))
def test_random_bytes_are_an_image_or_a_4xx(limits, data):
    _upload(data, limits)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 60000), st.integers(1, 60000))
def test_a_png_header_of_any_size_costs_no_memory_before_it_is_refused(limits, width, height):
    tracemalloc.start()
    try:
        answer = _upload(png_header(width, height), limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert getattr(answer, "status", None) in (400, 413)  # refused: too large, too small, or no pixel data to decode
    if width * height > limits[1]:
        assert answer.status == 413 and peak < 5 * 2**20, peak  # from the header alone
