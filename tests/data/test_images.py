"""Finding and decoding images: every mode becomes 8-bit RGB, every undecodable file is a BadImage."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from labelfew.data import images
from labelfew.data.images import (
    BadImage,
    ImageDataset,
    collate,
    find_images,
    image_extent,
    is_run_folder,
    load_resized,
    load_rgb,
    printable,
    require_images,
    scan_images,
    stored_extent,
    typical_image_side,
)
from labelfew.data.labels import read_labels
from labelfew.errors import UserError


def _png(path: Path, side: int = 8, color: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), color).save(path)
    return path


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# --- find_images ---------------------------------------------------------------------------------


def test_find_images_is_recursive_sorted_and_filters_extensions(tmp_path: Path) -> None:
    expected = [
        _png(tmp_path / "a.png"),
        _png(tmp_path / "deep" / "er" / "b.PNG"),
        _png(tmp_path / "sub" / "c.jpeg"),
    ]
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "labels.csv").write_text("path,label\n")
    (tmp_path / "sub" / "noextension").write_bytes(b"")
    assert find_images(tmp_path) == sorted(expected)


def test_find_images_skips_hidden_files_and_folders(tmp_path: Path) -> None:
    kept = _png(tmp_path / "kept.png")
    _png(tmp_path / ".hidden.png")
    _png(tmp_path / ".cache" / "thumb.png")
    _png(tmp_path / "sub" / ".git" / "x.png")
    assert find_images(tmp_path) == [kept]


def test_find_images_survives_a_symlink_loop_without_duplicates(tmp_path: Path) -> None:
    first = _png(tmp_path / "a" / "1.png")
    second = _png(tmp_path / "a" / "b" / "2.png")
    (tmp_path / "a" / "b" / "back_to_a").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a" / "self").symlink_to(tmp_path / "a" / "b", target_is_directory=True)
    found = find_images(tmp_path)
    assert len(found) == 2
    assert {path.resolve() for path in found} == {first.resolve(), second.resolve()}


def test_folder_links_out_of_the_folder_are_skipped_and_named_unless_follow_links(tmp_path: Path) -> None:
    outside = _png(tmp_path / "outside" / "x.png")
    inside = _png(tmp_path / "root" / "X" / "in.png")
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "root" / "X" / "up").symlink_to("..", target_is_directory=True)  # back into the root
    (tmp_path / "root" / "file.png").symlink_to(outside)
    (tmp_path / "root" / "X" / "same.png").symlink_to(inside)  # a link inside the root is followed
    found = scan_images(tmp_path / "root")
    assert found.paths == [  # a link to an image file is one image, wherever it points
        tmp_path / "root" / "X" / "in.png",
        tmp_path / "root" / "X" / "same.png",
        tmp_path / "root" / "file.png",
    ]
    assert [entry.split(":")[0] for entry in found.skipped] == [str(tmp_path / "root" / "linked")]
    assert all("--follow-links" in entry for entry in found.skipped)
    followed = scan_images(tmp_path / "root", follow_links=True)
    assert followed.skipped == []
    assert sorted(path.resolve() for path in followed.paths) == sorted(
        [outside.resolve(), outside.resolve(), inside.resolve(), inside.resolve()]
    )


def test_a_link_up_out_of_the_folder_does_not_read_the_siblings(tmp_path: Path) -> None:
    """`X/up -> ..` must not train on X's sibling folders; with --follow-links it ends (loop guard)."""
    kept = _png(tmp_path / "X" / "a.png")
    _png(tmp_path / "sibling" / "b.png")
    (tmp_path / "X" / "up").symlink_to("..", target_is_directory=True)
    assert scan_images(tmp_path / "X").paths == [kept]
    followed = scan_images(tmp_path / "X", follow_links=True).paths
    assert sorted(path.resolve() for path in followed) == [
        kept.resolve(),
        (tmp_path / "sibling" / "b.png").resolve(),
    ]


def test_fifos_named_like_images_are_skipped_counted_and_never_opened(tmp_path: Path) -> None:
    kept = _png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block forever
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "absent.jpg")
    found = scan_images(tmp_path)
    assert found.paths == [kept]
    assert found.skipped == [
        f"{tmp_path / 'broken.jpg'}: a broken link",
        f"{tmp_path / 'pipe.png'}: not a regular file (a FIFO, device or socket); never opened",
    ]
    with pytest.raises(UserError, match="2 skipped"):
        require_images(_folder_with_only_a_fifo(tmp_path / "only"))


def _folder_with_only_a_fifo(folder: Path) -> Path:
    folder.mkdir()
    os.mkfifo(folder / "x.png")
    (folder / "y.png").symlink_to(folder / "absent.png")
    return folder


def test_a_file_name_that_is_not_utf8_is_found_decoded_and_printable(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes: surrogate escapes in Python
    Image.new("RGB", (8, 8), (1, 2, 3)).save(os.path.join(tmp_path, name), format="PNG")
    [path] = find_images(tmp_path)
    assert path.name == name
    assert load_rgb(path).size == (8, 8)
    text = printable(path)
    assert text == f"{tmp_path}/caf\\xe9-\\xff.png"
    text.encode("utf-8")  # no UnicodeEncodeError
    assert printable(tmp_path / "été.png") == f"{tmp_path}/été.png"  # valid UTF-8 is unchanged


def test_run_folders_and_excluded_folders_are_never_input(tmp_path: Path) -> None:
    """`pretrain .` must not read its own `views.png` (or another run's), so it can resume."""
    kept = _png(tmp_path / "photos" / "a.png")
    stopped = tmp_path / "runs" / "x" / "pretrain"
    _png(stopped / "views.png")
    (stopped / "log.jsonl").write_text("")
    finished = tmp_path / "runs" / "y" / "finetune"
    _png(finished / "curves.png")
    (finished / "run.json").write_text(json.dumps({"labelfew_version": "1", "stage": "finetune"}))
    other = _png(tmp_path / "theirs" / "p.png")
    (tmp_path / "theirs" / "run.json").write_text('{"something": "else"}')  # not labelfew's: input
    own = _png(tmp_path / "out" / "pretrain" / "fresh.png")
    assert find_images(tmp_path, exclude=[own.parent]) == [kept, other]
    assert is_run_folder(stopped) and is_run_folder(finished) and not is_run_folder(other.parent)


def test_the_root_itself_is_read_even_when_it_looks_like_a_run(tmp_path: Path) -> None:
    kept = _png(tmp_path / "a.png")
    (tmp_path / "log.jsonl").write_text("")
    _png(tmp_path / "views.png")
    assert find_images(tmp_path) == [kept, tmp_path / "views.png"]


def test_find_images_refuses_a_missing_folder_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        find_images(tmp_path / "absent")
    with pytest.raises(UserError, match="not a folder"):
        find_images(_png(tmp_path / "a.png"))


# --- load_rgb: every mode to 8-bit RGB ----------------------------------------------------------


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "p.png", transparency=0)
    rgb = load_rgb(tmp_path / "p.png")
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert rgb.getpixel((1, 1)) == (255, 0, 0)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    values = np.zeros((2, 2, 4), dtype=np.uint8)
    values[0, 0] = (0, 0, 0, 0)  # transparent
    values[0, 1] = (0, 0, 255, 255)  # opaque blue
    values[1, 0] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(values, "RGBA").save(tmp_path / "a.png")
    rgb = _pixels(load_rgb(tmp_path / "a.png"))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (0, 0, 255)
    assert all(120 <= value <= 135 for value in rgb[1, 0])


def test_la_is_composited_on_white(tmp_path: Path) -> None:
    values = np.array([[[0, 0], [50, 255]]], dtype=np.uint8)
    Image.fromarray(values, "LA").save(tmp_path / "la.png")
    rgb = _pixels(load_rgb(tmp_path / "la.png"))
    assert rgb.shape == (1, 2, 3)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (50, 50, 50)


def test_cmyk_is_converted(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # red in CMYK
    rgb = load_rgb(tmp_path / "c.jpg")
    assert rgb.mode == "RGB"
    red, green, blue = rgb.getpixel((4, 4))  # type: ignore[misc]
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_grayscale_goes_through_its_own_percentiles_without_a_window(tmp_path: Path) -> None:
    # No fixed /65535 any more (issue 26): a 12-bit image spans the 8 bits (`tests/data/test_pixels.py`).
    values = np.arange(0, 4000, 4, dtype=np.uint16).reshape(20, 50)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = _pixels(load_rgb(tmp_path / "g16.png"))
    low, high = np.percentile(values, (0.5, 99.5))
    expected = np.clip(np.rint((values - low) * 255.0 / (high - low)), 0, 255)
    assert rgb.dtype == np.uint8 and np.array_equal(rgb[..., 0], expected)
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    Image.fromarray(np.full((2, 2), 1000, dtype=np.uint16)).save(tmp_path / "flat.png")
    assert np.all(_pixels(load_rgb(tmp_path / "flat.png")) == 0)  # a constant image: nothing above its window


def test_float_images_are_windowed_like_integer_ones(tmp_path: Path) -> None:
    Image.fromarray(np.array([[-2.0, 2.0, 0.5]], dtype=np.float32)).save(tmp_path / "wide.tif")
    window = np.percentile([-2.0, 2.0, 0.5], (0.5, 99.5))
    expected = np.clip(
        np.rint((np.array([-2.0, 2.0, 0.5]) - window[0]) * 255 / (window[1] - window[0])), 0, 255
    )
    assert list(_pixels(load_rgb(tmp_path / "wide.tif"))[0, :, 2]) == list(expected)


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=10)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    assert load_rgb(tmp_path / "anim.gif").getpixel((3, 3)) == (255, 0, 0)


def _truncated_jpeg(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width × height` pixels (no image data needed to trip the check)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(header))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    )
    return path


BAD_FILES = {
    "zero_bytes": lambda folder: (folder / "empty.png", b""),
    "text_with_jpg_name": lambda folder: (folder / "notes.jpg", b"these are notes, not a photo\n"),
    "random_bytes": lambda folder: (folder / "noise.png", bytes(range(256)) * 4),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_undecodable_files_raise_bad_image_naming_the_file(tmp_path: Path, kind: str) -> None:
    path, data = BAD_FILES[kind](tmp_path)
    path.write_bytes(data)
    with pytest.raises(BadImage, match=path.name):
        load_rgb(path)


def test_truncated_jpeg_is_a_bad_image(tmp_path: Path) -> None:
    path = _truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(BadImage, match=r"cut.jpg"):
        load_rgb(path)


def test_missing_file_is_a_bad_image(tmp_path: Path) -> None:
    with pytest.raises(BadImage):
        load_rgb(tmp_path / "gone.png")


def test_a_png_claiming_a_huge_size_is_a_decompression_bomb(tmp_path: Path) -> None:
    path = _png_claiming_size(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(BadImage, match=r"bomb.png"):
        load_rgb(path)


def test_images_past_the_warning_limit_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _png(tmp_path / "medium.png", side=8)  # 64 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 64 is in Pillow's warning zone (1-2x)
    with pytest.raises(BadImage, match=r"medium.png"):
        load_rgb(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # past 2x: Pillow's own error
    with pytest.raises(BadImage, match=r"medium.png"):
        load_rgb(path)


def test_module_keeps_pillows_bomb_limit() -> None:
    assert images.MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS > 0


# --- typical_image_side ------------------------------------------------------------------------


def test_typical_image_side_is_the_median_shorter_side(tmp_path: Path) -> None:
    paths = []
    for index, (width, height) in enumerate([(32, 40), (48, 30), (100, 64)]):
        paths.append(tmp_path / f"{index}.png")
        Image.new("RGB", (width, height)).save(paths[-1])
    assert typical_image_side(paths) == 32
    big = [_png(tmp_path / f"big{index}.png", side=300) for index in range(3)]
    assert typical_image_side(big) == 224  # capped
    assert typical_image_side(big, cap=256) == 256


def test_typical_image_side_ignores_bad_files_and_refuses_all_bad(tmp_path: Path) -> None:
    good = _png(tmp_path / "good.png", side=20)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert typical_image_side([bad, good, bad]) == 20
    with pytest.raises(UserError, match="could be opened"):
        typical_image_side([bad, bad])


# --- ImageDataset --------------------------------------------------------------------------------


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def test_dataset_replaces_a_bad_file_with_the_next_good_one(tmp_path: Path) -> None:
    first = _png(tmp_path / "0.png", color=(1, 1, 1))
    (tmp_path / "1.png").write_bytes(b"")
    (tmp_path / "2.png").write_text("text")
    third = _png(tmp_path / "3.png", color=(3, 3, 3))
    dataset = ImageDataset([first, tmp_path / "1.png", tmp_path / "2.png", third], _to_tensor, [0, 1, 2, 3])
    image, label, index, bad = dataset[1]
    assert (label, index, bad) == (3, 3, [1, 2])
    assert int(image[0, 0, 0]) == 3
    assert dataset[0][1:] == (0, 0, [])


def test_dataset_wraps_around_and_gives_minus_one_without_labels(tmp_path: Path) -> None:
    good = _png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    dataset = ImageDataset([good, bad], _to_tensor)
    assert dataset[1][1:] == (-1, 0, [1])


def test_dataset_with_only_bad_files_stops_after_max_attempts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    with pytest.raises(RuntimeError, match="could not be decoded"):
        ImageDataset([bad] * 3, _to_tensor, max_attempts=5)[0]


def test_collate_stacks_single_images_and_view_pairs(tmp_path: Path) -> None:
    paths = [_png(tmp_path / f"{index}.png") for index in range(3)]
    single = collate([ImageDataset(paths, _to_tensor, [0, 1, 2])[index] for index in range(3)])
    assert single["images"].shape == (3, 3, 8, 8)
    assert single["labels"].tolist() == [0, 1, 2] and single["bad"] == []
    pairs = ImageDataset(paths, lambda image: (_to_tensor(image), _to_tensor(image)))
    batch = collate([pairs[0], pairs[1]])
    assert [view.shape for view in batch["images"]] == [(2, 3, 8, 8), (2, 3, 8, 8)]
    assert batch["labels"].tolist() == [-1, -1] and batch["indices"].tolist() == [0, 1]


# --- load_resized: what both image sources store ----------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "side"), [(500, 375, 256), (333, 500, 256), (96, 96, 110), (40, 30, 32)]
)
def test_load_resized_is_torchvisions_resize_and_never_upsamples(
    tmp_path: Path, width: int, height: int, side: int
) -> None:
    """torchvision's ``Resize`` of the uint8 tensor, pixel for pixel; within 2/255 of its PIL resize."""
    from torchvision.transforms import v2

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    resized = load_resized(tmp_path / "photo.png", side)
    if min(width, height) <= side:
        assert np.array_equal(resized, pixels)  # kept pixel for pixel
    else:
        resize = v2.Resize(side, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        expected = resize(torch.from_numpy(pixels).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        assert np.array_equal(resized, expected)
        pil = np.array(resize(Image.fromarray(pixels))).astype(int)
        assert np.abs(resized.astype(int) - pil).max() <= 2
        assert min(resized.shape[:2]) == side
    assert resized.dtype == np.uint8 and resized.flags.writeable
    assert image_extent(tmp_path / "photo.png") == (height, width)
    assert stored_extent(height, width, side) == resized.shape[:2]


# --- EXIF orientation -----------------------------------------------------------------------------


def rotated_jpeg(path: Path, orientation: int, width: int = 48, height: int = 24) -> Path:
    """A JPEG stored as a camera stores it, with the EXIF Orientation tag that says how to turn it.

    Quadrants of distinct colours make every one of the 8 orientations look different."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (250, 10, 10)
    pixels[: height // 2, width // 2 :] = (10, 250, 10)
    pixels[height // 2 :, : width // 2] = (10, 10, 250)
    pixels[height // 2 :, width // 2 :] = (250, 250, 10)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillows_exif_transpose(tmp_path: Path, orientation: int) -> None:
    path = rotated_jpeg(tmp_path / "photo.jpg", orientation)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    decoded = np.asarray(load_rgb(path))
    assert np.array_equal(decoded, expected)
    assert decoded.shape[:2] == ((48, 24) if orientation >= 5 else (24, 48))
    assert image_extent(path) == decoded.shape[:2]  # the header's size is the upright one
    assert load_resized(path, side=12).shape == ((24, 12, 3) if orientation >= 5 else (12, 24, 3))


def test_malformed_exif_orientation_is_ignored(tmp_path: Path) -> None:
    path = rotated_jpeg(tmp_path / "photo.jpg", orientation=1)
    with Image.open(path) as image:
        stored = np.asarray(image.convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 99  # not an orientation
    Image.fromarray(stored).save(tmp_path / "odd.jpg", format="JPEG", quality=95, exif=exif)
    assert load_rgb(tmp_path / "odd.jpg").size == (48, 24)
    assert image_extent(tmp_path / "odd.jpg") == (24, 48)


def test_a_label_tree_of_links_into_a_pool_keeps_its_labels(tmp_path: Path) -> None:
    """A labelled tree is often links into an image pool: those are labels, so they are followed."""
    pool = _png(tmp_path / "pool" / "a.png")
    (tmp_path / "labels" / "cat").mkdir(parents=True)
    (tmp_path / "labels" / "cat" / "a.png").symlink_to(pool)
    _png(tmp_path / "labels" / "dog" / "b.png")
    assert read_labels(tmp_path / "labels").labels == ("cat", "dog")
