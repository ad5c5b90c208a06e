"""Decoding deep, gray, multi-channel and DICOM files (`labelfew.data.pixels`, `labelfew.data.dicom`)
against hand-written formulas and Pillow / pydicom / tifffile as references."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from medical_images import (
    deep_pixels,
    digits,
    multichannel_pixels,
    write_deep,
    write_deep_folder,
    write_dicom,
    write_multichannel_tiff,
)
from PIL import Image, ImageOps

from labelfew.data.device_decode import orient
from labelfew.data.images import load_resized, load_rgb, require_images
from labelfew.data.pixels import (
    BadImage,
    VoiWindow,
    apply_window,
    decode_array,
    display_image,
    header_extent,
    orient_array,
    read_raw,
)
from labelfew.data.survey import survey_images
from labelfew.errors import UserError
from labelfew.spec import Decoding


def _hand_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The window, written out: low -> 0, high -> 255, linear, clipped, rounded."""
    out = np.empty(values.shape, dtype=np.uint8)
    for index, value in np.ndenumerate(values.astype(np.float64)):
        out[index] = int(min(255.0, max(0.0, np.rint((value - low) / (high - low) * 255.0))))
    return out


def _dicom_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR), output 0-255, written out case by case."""
    out = np.empty(x.shape, dtype=np.uint8)
    for index, value in np.ndenumerate(x):
        if value <= center - 0.5 - (width - 1) / 2:
            out[index] = 0
        elif value > center - 0.5 + (width - 1) / 2:
            out[index] = 255
        else:
            out[index] = int(np.rint(((value - (center - 0.5)) / (width - 1) + 0.5) * 255))
    return out


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_12_bit_image_keeps_its_tonal_range(tmp_path: Path, suffix: str) -> None:
    root = write_deep_folder(tmp_path / "xray", per_class=4, side=48, suffix=suffix)
    paths = sorted(root.rglob(f"*{suffix}"))
    survey = survey_images(paths)
    assert survey.deep and survey.channels == 1
    pixels = decode_array(paths[0], survey.decoding)
    assert pixels.shape == (48, 48, 1) and len(np.unique(pixels)) >= 200
    stored = np.asarray(read_raw(paths[0]).values)
    assert stored.dtype == np.uint16 and stored.max() <= 4095
    assert len(np.unique(np.rint(stored * (255 / 65535)))) <= 17  # the old fixed gain: 16 levels
    assert len(np.unique(np.asarray(load_rgb(paths[0])))) >= 200  # that path is gone from load_rgb too


def test_window_maths_is_the_hand_formula() -> None:
    values = np.random.default_rng(0).uniform(-500, 5000, (17, 13)).astype(np.float32)
    assert np.array_equal(apply_window(values, (100.0, 4000.0)), _hand_window(values, 100.0, 4000.0))
    assert np.array_equal(apply_window(values, (0, 1)), np.where(values >= 1, 255, 0))  # clipped
    assert np.array_equal(apply_window(values, (7.0, 7.0)), np.where(values > 7, 255, 0))  # a threshold


def test_the_dicom_linear_window_is_the_standards_and_pydicoms() -> None:
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_voi_lut

    x = np.arange(-200, 1400, dtype=np.float64)
    for center, width in ((600.0, 800.0), (40.0, 400.0), (1000.5, 2.0)):
        ours = VoiWindow(center, width).apply(x)
        assert np.array_equal(ours, _dicom_linear(x, center, width))
        dataset = Dataset()
        dataset.PhotometricInterpretation, dataset.BitsStored, dataset.PixelRepresentation = (
            "MONOCHROME2",
            16,
            0,
        )
        dataset.WindowCenter, dataset.WindowWidth = center, width
        theirs = apply_voi_lut(x.copy(), dataset)
        scaled = (theirs - theirs.min()) / (theirs.max() - theirs.min()) * 255
        assert np.abs(ours - scaled).max() <= 0.5 + 1e-6


def test_dicom_pixels_are_rescaled_windowed_and_monochrome1_inverted(tmp_path: Path) -> None:
    stored = np.random.default_rng(1).integers(0, 4096, (9, 11)).astype(np.uint16)
    hounsfield = stored * 2.0 - 1024.0
    file = write_dicom(
        tmp_path / "ct.dcm", stored, slope=2.0, intercept=-1024.0, window=([40.0, 300.0], [400.0, 1500.0])
    )
    windowed = _dicom_linear(hounsfield, 40.0, 400.0)  # the first of a multi-valued window
    assert np.array_equal(decode_array(file, Decoding(channels=1))[..., 0], windowed)
    assert np.array_equal(decode_array(file)[..., 2], windowed)
    mono1 = write_dicom(tmp_path / "m1.dcm", stored, slope=2.0, intercept=-1024.0, window=(40.0, 400.0),
                        photometric="MONOCHROME1")  # fmt: skip
    assert np.array_equal(decode_array(mono1, Decoding(channels=1))[..., 0], 255 - windowed)
    # the file's window yields to the run's when file_windows is off, and a file without one takes the run's
    by_hand = Decoding(channels=1, window=(-1000.0, 3000.0), file_windows=False)
    assert np.array_equal(decode_array(file, by_hand)[..., 0], _hand_window(hounsfield, -1000.0, 3000.0))
    plain = write_dicom(tmp_path / "plain.dcm", stored, slope=2.0, intercept=-1024.0)
    run_window = Decoding(channels=1, window=(-1000.0, 3000.0))
    assert np.array_equal(decode_array(plain, run_window)[..., 0], _hand_window(hounsfield, -1000.0, 3000.0))
    assert header_extent(file) == (9, 11)


def test_multi_frame_and_plugin_compressed_dicoms_are_bad_images_that_say_why(tmp_path: Path) -> None:
    frames = write_dicom(tmp_path / "cine.dcm", np.zeros((3, 8, 8), dtype=np.uint16))
    with pytest.raises(BadImage, match="3 frames"):
        decode_array(frames)
    compressed = write_dicom(
        tmp_path / "jpeg.dcm", np.zeros((8, 8), dtype=np.uint16), syntax="1.2.840.10008.1.2.4.70"
    )
    with pytest.raises(
        BadImage, match=r"JPEG Lossless.*pip install pylibjpeg pylibjpeg-libjpeg.*python-gdcm"
    ):
        decode_array(compressed)


def test_a_file_with_the_dicom_preamble_is_read_as_dicom(tmp_path: Path) -> None:
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 60
    file = write_dicom(tmp_path / "IM0001", stored, window=(1900.0, 3800.0))
    assert np.array_equal(
        decode_array(file, Decoding(channels=1))[..., 0], _dicom_linear(stored, 1900.0, 3800.0)
    )


def test_dicom_without_pydicom_is_refused_at_scan_time_with_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dicom(tmp_path / "a.dcm", np.zeros((8, 8), dtype=np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(UserError, match=r"a\.dcm.*pip install 'labelfew\[dicom\]'"):
        require_images(tmp_path)
    with pytest.raises(BadImage, match=r"pip install 'labelfew\[dicom\]'"):
        decode_array(tmp_path / "a.dcm")


@pytest.mark.parametrize("planar", [False, True])
def test_a_4_channel_tiff_round_trips_exactly(tmp_path: Path, planar: bool) -> None:
    pixels = multichannel_pixels(digits(1, 1, 24)[0][0], channels=4)
    file = write_multichannel_tiff(tmp_path / "cells.tif", pixels, planar=planar)
    assert np.array_equal(decode_array(file, Decoding(channels=4)), pixels)
    assert np.array_equal(display_image(file, Decoding(channels=4)), pixels[..., :3])  # first three
    with pytest.raises(BadImage, match=r"4 channel.*--channels 4"):
        decode_array(file)
    assert header_extent(file) == (24, 24)


def test_a_16_bit_4_channel_tiff_goes_through_the_window(tmp_path: Path) -> None:
    pixels = multichannel_pixels(digits(1, 1, 16)[0][0], channels=4, bits=12)
    file = write_multichannel_tiff(tmp_path / "deep.tif", pixels)
    assert np.array_equal(decode_array(file, Decoding(4, (0.0, 4095.0))), _hand_window(pixels, 0.0, 4095.0))


def test_an_rgba_tiff_has_4_channels_and_is_composited_on_white_as_rgb(tmp_path: Path) -> None:
    rgba = np.random.default_rng(2).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.tif")
    assert np.array_equal(decode_array(tmp_path / "rgba.tif", Decoding(channels=4)), rgba)
    expected = Image.alpha_composite(
        Image.new("RGBA", (5, 6), (255, 255, 255, 255)), Image.fromarray(rgba, "RGBA")
    )
    assert np.array_equal(decode_array(tmp_path / "rgba.tif"), np.asarray(expected.convert("RGB")))


def test_channels_1_keeps_gray_and_turns_colour_into_pillows_luma(tmp_path: Path) -> None:
    colour = np.random.default_rng(3).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "c.png")
    Image.fromarray(colour[..., 0]).save(tmp_path / "g.png")
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    assert np.array_equal(decode_array(tmp_path / "c.png", Decoding(channels=1))[..., 0], luma)
    assert np.array_equal(decode_array(tmp_path / "g.png", Decoding(channels=1))[..., 0], colour[..., 0])
    assert np.array_equal(decode_array(tmp_path / "g.png"), np.repeat(colour[..., :1], 3, axis=2))
    assert display_image(tmp_path / "c.png", Decoding(channels=1)).mode == "L"
    assert display_image(tmp_path / "c.png").mode == "RGB"
    resized = load_resized(tmp_path / "c.png", 4, decoding=Decoding(channels=1))
    assert resized.shape == (4, 5, 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_array_is_pillows_exif_transpose(orientation: int) -> None:
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    assert np.array_equal(orient_array(pixels, orientation), expected)
    on_device = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation)  # nvJPEG's path
    assert np.array_equal(on_device.permute(1, 2, 0).numpy(), expected)


def test_survey_picks_channels_and_window_and_measures_mean_and_std(tmp_path: Path) -> None:
    root = write_deep_folder(tmp_path / "deep", per_class=3, side=16)
    paths = sorted(root.rglob("*.png"))
    survey = survey_images(paths, pixels=20_000, seed=5)
    assert survey.channels == 1 and survey.deep and survey.multichannel is None
    every = np.concatenate([read_raw(path).values.ravel() for path in paths]).astype(np.float64)
    assert survey.window is not None
    assert np.allclose(survey.window, np.percentile(every, (0.5, 99.5)), atol=60)  # of 4095
    decoded = np.concatenate([decode_array(path, survey.decoding).ravel() / 255.0 for path in paths])
    assert abs(survey.mean[0] - decoded.mean()) < 0.01 and abs(survey.std[0] - decoded.std()) < 0.01
    assert survey_images(paths, pixels=64, seed=5) == survey_images(paths, pixels=64, seed=5)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "0" / "colour.png")
    mixed = survey_images(sorted(root.rglob("*.png")), window=(0.0, 4095.0))
    assert mixed.channels == 3 and mixed.window == (0.0, 4095.0) and len(mixed.mean) == 3
    assert mixed.record()["window"] == [0.0, 4095.0]


def test_8_bit_folders_have_no_window(digits_folder: tuple[Path, Path]) -> None:
    survey = survey_images(sorted(digits_folder[1].rglob("*.png")), sample=20)
    assert not survey.deep and survey.window is None and survey.channels == 3  # the digits are RGB PNGs


def test_different_channel_counts_above_3_name_two_files(tmp_path: Path) -> None:
    image = digits(1, 1, 8)[0][0]
    write_multichannel_tiff(tmp_path / "four.tif", multichannel_pixels(image, 4))
    write_multichannel_tiff(tmp_path / "five.tif", multichannel_pixels(image, 5))
    with pytest.raises(UserError, match=r"four\.tif has 4 channels.*five\.tif has 5 channels"):
        survey_images([tmp_path / "four.tif", tmp_path / "five.tif"])
    assert survey_images([tmp_path / "four.tif"]).multichannel == 4
    write_deep(tmp_path / "gray.png", deep_pixels(image))
    with pytest.raises(UserError, match=r"gray\.png has 1 or 3 channels.*four\.tif has 4"):
        survey_images([tmp_path / "four.tif", tmp_path / "gray.png"])


def test_thumbnails_of_multichannel_and_dicom_files(tmp_path: Path) -> None:
    from labelfew.data.image_hashes import thumbnail

    pixels = multichannel_pixels(digits(1, 1, 40)[0][0], channels=4)
    file = write_multichannel_tiff(tmp_path / "cells.tif", pixels)
    expected = Image.fromarray(pixels[..., :3]).convert("L").resize((32, 32), Image.Resampling.BOX)
    assert np.array_equal(thumbnail(file), np.asarray(expected, dtype=np.float32))  # type: ignore[arg-type]
    dicom = write_dicom(tmp_path / "a.dcm", deep_pixels(digits(1, 1, 40)[0][0]), window=(2048.0, 4096.0))
    assert thumbnail(dicom) is not None


def test_a_rotated_multichannel_tiff_is_turned_upright_and_its_header_says_so(tmp_path: Path) -> None:
    import tifffile

    pixels = multichannel_pixels(digits(1, 1, 8)[0][0][:, :5], channels=4)  # 8 x 5
    tifffile.imwrite(
        tmp_path / "turned.tif",
        pixels,
        photometric="minisblack",
        planarconfig="contig",
        extratags=[(274, 3, 1, 6, True)],
    )
    assert np.array_equal(
        decode_array(tmp_path / "turned.tif", Decoding(channels=4)), orient_array(pixels, 6)
    )
    assert header_extent(tmp_path / "turned.tif") == (5, 8)


def test_a_multi_page_tiff_has_its_pages_as_channels_and_its_first_page_as_rgb(tmp_path: Path) -> None:
    import tifffile

    pages = multichannel_pixels(digits(1, 1, 12)[0][0], channels=5)
    tifffile.imwrite(tmp_path / "pages.tif", np.moveaxis(pages, -1, 0), photometric="minisblack")
    assert tifffile.TiffFile(tmp_path / "pages.tif").series[0].axes == "QYX"
    assert np.array_equal(decode_array(tmp_path / "pages.tif", Decoding(channels=5)), pages)
    with Image.open(tmp_path / "pages.tif") as first:  # what Pillow, and labelfew before, read
        assert np.array_equal(decode_array(tmp_path / "pages.tif"), np.asarray(first.convert("RGB")))


def test_signed_dicom_values_keep_their_sign(tmp_path: Path) -> None:
    stored = np.array([[-1000, -10], [0, 900]], dtype=np.int16)
    file = write_dicom(tmp_path / "signed.dcm", stored, signed=True, bits_stored=16)
    assert np.array_equal(read_raw(file).values[..., 0], stored)
    expected = _hand_window(stored, -1000.0, 1000.0)
    assert np.array_equal(
        decode_array(file, Decoding(channels=1, window=(-1000.0, 1000.0)))[..., 0], expected
    )


def test_tifffile_and_pydicom_files_above_the_pixel_limit_are_bad_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import labelfew.data.pixels as pixels_module

    dicom = write_dicom(tmp_path / "big.dcm", np.zeros((8, 8), dtype=np.uint16))
    tiff = write_multichannel_tiff(tmp_path / "big.tif", np.zeros((8, 8, 5), dtype=np.uint8))
    assert decode_array(tiff, Decoding(channels=5)).shape == (8, 8, 5)
    monkeypatch.setattr(pixels_module, "MAX_IMAGE_PIXELS", 40)
    for path in (dicom, tiff):
        with pytest.raises(BadImage, match="64 pixels, more than the limit of 40"):
            decode_array(path, Decoding(channels=5 if path == tiff else 1))


def test_a_16_bit_pgm_is_found_and_windowed(tmp_path: Path) -> None:
    values = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 200).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "frame.pgm")
    assert require_images(tmp_path).paths == [tmp_path / "frame.pgm"]
    window = Decoding(channels=1, window=(0.0, 3800.0))
    assert np.array_equal(
        decode_array(tmp_path / "frame.pgm", window)[..., 0], _hand_window(values, 0.0, 3800.0)
    )


def test_a_survey_reads_jpegs_at_a_draft_scale_and_measures_the_same(
    hymenoptera: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder of large photos is surveyed from libjpeg's reduced decode: the shapes shrink, the
    channels and statistics do not move (against a full decode of the same sample)."""
    import labelfew.data.survey as survey

    paths = sorted(hymenoptera.rglob("*.jpg"))[:40]
    assert read_raw(paths[0], draft=64).values.shape[0] * 8 == read_raw(paths[0]).values.shape[0]
    drafted = survey.survey_images(paths, channels=1)
    monkeypatch.setattr(survey, "SURVEY_DRAFT", None)
    full = survey.survey_images(paths, channels=1)
    assert drafted.channels == full.channels == 1
    assert abs(drafted.mean[0] - full.mean[0]) < 0.01 and abs(drafted.std[0] - full.std[0]) < 0.01
