"""Reading images and masks: modes, EXIF orientation, masks of every kind, sizes, the input size."""

import logging

import numpy as np
import pytest
from PIL import Image

from anomatune.data.images import ImageTooLarge, image_size_of, input_size, read_image, read_mask, unreadable
from anomatune.data.settings import parse_image_size
from anomatune.errors import DataError

from ..conftest import png_header, save_image


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK", "1"])
def test_any_mode_reads_as_rgb(tmp_path, mode):
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    if mode == "I;16":
        Image.fromarray(np.full((12, 16), 65535, np.uint16)).save(path)
    else:
        Image.new(mode, (16, 12)).save(path)
    img = read_image(path)
    assert img.mode == "RGB" and img.size == (16, 12)
    if mode == "I;16":
        assert np.asarray(img).min() == 255  # full 16-bit range maps onto full 8-bit range


def phone_jpeg(path, size=(40, 30), orientation=6):
    """A JPEG stored landscape with EXIF orientation 6 (shot in portrait): the left column is red."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied(tmp_path, caplog, monkeypatch):
    from anomatune.data import images

    monkeypatch.setattr(images, "_logged", set())  # the fix-up is logged once per process
    path = phone_jpeg(tmp_path / "phone.jpg")
    with caplog.at_level(logging.WARNING):
        img = read_image(path)
    assert img.size == (30, 40)  # upright: portrait
    assert np.asarray(img)[:4, :, 0].mean() > 200  # orientation 6 turns the left column into the top row
    assert image_size_of(path) == (30, 40)  # the header-only size agrees
    assert any("EXIF orientation" in r.message for r in caplog.records)


def test_masks_01_label_maps_and_antialiased_are_binarised(tmp_path):
    arr = np.zeros((6, 8), np.uint8)
    arr[2:4, 2:4] = 1
    Image.fromarray(arr).save(tmp_path / "m01.png")
    assert read_mask(tmp_path / "m01.png").sum() == 4  # not erased by the > 127 threshold
    arr[0, 0] = 3  # a label map: one value per defect
    Image.fromarray(arr).save(tmp_path / "labels.png")
    assert read_mask(tmp_path / "labels.png").sum() == 5
    arr[:] = 0
    arr[2:4, 2:4] = 200
    arr[0, 0] = 100
    Image.fromarray(arr).save(tmp_path / "grey.png")
    assert read_mask(tmp_path / "grey.png").sum() == 4


def test_tiny_truncated_and_unreadable_images_are_one_line(tmp_path):
    save_image(tmp_path / "dot.png", size=(1, 1))
    with pytest.raises(DataError, match=r"dot.png: the image is 1x1 px, too small to inspect"):
        read_image(tmp_path / "dot.png")
    good = save_image(tmp_path / "cut.png", size=(64, 64))
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cut.png: cannot read image .*replace or remove the file"):
        read_image(good)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png: cannot read image"):
        read_image(tmp_path / "text.png")


def test_input_size_keeps_the_aspect_ratio():
    assert input_size(256, 1.0) == (256, 256)
    assert input_size(256, 2.5) == (256, 640)  # short side 256, wide images
    assert input_size(256, 0.5) == (512, 256)  # tall images
    assert input_size("320x256", 3.0) == (256, 320)  # WxH exactly
    assert input_size((100, 50)) == (100, 50)
    assert parse_image_size(" 320 X 256 ") == "320x256" and parse_image_size(128) == "128"
    with pytest.raises(ValueError, match="16 to 8192"):
        parse_image_size(0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns from 89 megapixels on
def test_an_image_over_the_pixel_budget_is_refused_from_its_header(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_header(12000, 12000))  # no pixel data: decoding it would fail, so the refusal comes first
    with pytest.raises(ImageTooLarge, match=r"big.png: 12000x12000 px \(144.0 megapixels\) is more than the 100 megapixels"):
        read_image(big, max_pixels=100_000_000)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))  # past Pillow's own bound: refused by Pillow before ours
    with pytest.raises(ImageTooLarge, match=r"bomb.png: 400.0 megapixels is more than"):
        read_image(bomb)
    save_image(tmp_path / "ok.png", size=(40, 30))
    assert read_image(tmp_path / "ok.png", max_pixels=1200).size == (40, 30)  # the bound itself is accepted
    with pytest.raises(ImageTooLarge):
        read_image(tmp_path / "ok.png", max_pixels=1199)


def test_a_large_image_leaves_no_pillow_warning_on_stderr(tmp_path):
    import warnings

    from anomatune.data.images import header_size

    big = tmp_path / "big.png"
    big.write_bytes(png_header(12000, 12000))  # over Pillow's warning bound (89 MP), under our budget
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail here
        assert header_size(big, "big.png", max_pixels=200_000_000) == (12000, 12000)
        assert "cannot read image" in unreadable([big], max_pixels=200_000_000)[0]  # no pixel data: named, no warning


def test_every_unreadable_file_is_named(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", size=(40, 30))
    (tmp_path / "1.png").write_bytes((tmp_path / "1.png").read_bytes()[:60])
    (tmp_path / "2.png").write_bytes(b"not an image")
    problems = unreadable(sorted(tmp_path.glob("*.png")))
    assert [p.split(":")[0] for p in problems] == [str(tmp_path / "1.png"), str(tmp_path / "2.png")]
