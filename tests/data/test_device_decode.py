"""JPEG decoding on the training device: the same batches as the streaming source's CPU decoder.

nvJPEG needs CUDA, so on the CPU the device decoder is `torchvision.io.decode_jpeg` on the CPU (the
same batched call); the CUDA test at the end compares nvJPEG with the CPU decoder where a GPU is.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from labelfew.data.batches import EpochOrder
from labelfew.data.device_decode import (
    DeviceDecodedBatches,
    RawFiles,
    decode_jpegs,
    decode_place,
    device_decodable,
    orient,
)
from labelfew.data.images import find_images, load_resized
from labelfew.data.stream import DecodedFiles, StreamBatches
from labelfew.errors import UserError


def _photos(hymenoptera: Path, count: int) -> list[Path]:
    return find_images(hymenoptera / "train" / "ants")[:count]


def _order(count: int, batch_size: int) -> EpochOrder:
    return EpochOrder(count, batch_size, seed=0, shuffle=False, drop_last=False)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_the_image_as_pillows_exif_transpose(orientation: int) -> None:
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    turned = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert turned.shape == expected.shape
    assert np.array_equal(turned, expected)


def test_the_device_decoder_gives_the_cpu_streams_batches(hymenoptera: Path) -> None:
    paths = _photos(hymenoptera, 6)
    reference = StreamBatches(DecodedFiles(paths, 96), _order(len(paths), 3), "cpu", workers=0)
    device = DeviceDecodedBatches(RawFiles(paths, 96), _order(len(paths), 3), "cpu", workers=0)
    for expected, got in zip(reference, device, strict=True):
        assert torch.equal(expected.indices, got.indices)
        assert torch.equal(expected.sizes, got.sizes)
        difference = (expected.images.int() - got.images.int()).abs().float()
        assert difference.mean() < 1.0  # two JPEG decoders (Pillow's and torchvision's) and their rounding
        assert difference.max() <= 40
    assert device.device_decoded == len(paths) and device.cpu_fallbacks == 0


def test_a_rotated_jpeg_comes_out_upright(tmp_path: Path, hymenoptera: Path) -> None:
    photo = Image.open(_photos(hymenoptera, 1)[0]).convert("RGB")
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    path = tmp_path / "phone.jpg"
    photo.save(path, quality=95, exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    batch = DeviceDecodedBatches(RawFiles([path], 4000), _order(1, 1), "cpu", workers=0).decode(
        [RawFiles([path], 4000)[0]]
    )
    height, width = (int(value) for value in batch.sizes[0])
    assert (height, width) == upright.shape[:2]
    got = batch.images[0, :, :height, :width].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - upright.astype(int)).mean() < 1.0


def test_pngs_and_progressive_jpegs_are_decoded_on_the_cpu_and_counted(
    tmp_path: Path, hymenoptera: Path
) -> None:
    photo = Image.open(_photos(hymenoptera, 1)[0]).convert("RGB")
    photo.save(tmp_path / "a.png")
    photo.save(tmp_path / "b.jpg", progressive=True)
    photo.save(tmp_path / "c.jpg")
    paths = find_images(tmp_path)
    assert [device_decodable(path.read_bytes())[0] for path in paths] == [False, False, True]
    batches = DeviceDecodedBatches(RawFiles(paths, 64), _order(3, 3), "cpu", workers=0)
    (batch,) = list(batches)
    assert batches.cpu_fallbacks == 2 and batches.device_decoded == 1
    for row, path in enumerate(paths):
        expected = torch.from_numpy(load_resized(path, 64)).permute(2, 0, 1)
        height, width = expected.shape[1:]
        assert torch.equal(batch.sizes[row], torch.tensor([height, width]))
        if row < 2:
            assert torch.equal(batch.images[row, :, :height, :width], expected)


def test_an_unreadable_file_is_skipped_and_reported(tmp_path: Path, hymenoptera: Path) -> None:
    Image.open(_photos(hymenoptera, 1)[0]).convert("RGB").save(tmp_path / "b.jpg")
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    paths = find_images(tmp_path)
    (batch,) = list(DeviceDecodedBatches(RawFiles(paths, 64), _order(2, 2), "cpu", workers=0))
    assert batch.bad == [0]
    assert batch.indices.tolist() == [1, 1]  # replaced by the next readable file, as the CPU stream does


def test_a_batch_the_decoder_refuses_is_retried_file_by_file(hymenoptera: Path) -> None:
    good = torch.frombuffer(bytearray(_photos(hymenoptera, 1)[0].read_bytes()), dtype=torch.uint8)
    broken = good[: len(good) // 3].clone()
    decoded = decode_jpegs([good, broken], torch.device("cpu"))
    assert decoded[0] is not None and decoded[1] is None


def test_decode_on_device_needs_cuda() -> None:
    with pytest.raises(UserError, match=r"--decode-on device .* CUDA"):
        decode_place("device", torch.device("cpu"), streamed=True)
    with pytest.raises(UserError, match="--decode-on gpu: use one of auto, cpu, device"):
        decode_place("gpu", torch.device("cpu"), streamed=True)
    assert decode_place("auto", torch.device("cpu"), streamed=True) == "cpu"
    assert decode_place("auto", torch.device("cuda"), streamed=True) == "device"
    assert decode_place("auto", torch.device("cuda"), streamed=False) == "cpu"


def test_decode_on_device_is_for_rgb_only() -> None:
    """nvJPEG gives 3 channels: a 1- or N-channel run decodes on the CPU, and asking for the device refuses."""
    assert decode_place("auto", torch.device("cuda"), streamed=True, channels=1) == "cpu"
    assert decode_place("auto", torch.device("cuda"), streamed=True, channels=4) == "cpu"
    with pytest.raises(UserError, match=r"--decode-on device decodes RGB JPEGs .* 1 channel"):
        decode_place("device", torch.device("cuda"), streamed=True, channels=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs a CUDA GPU")
def test_nvjpeg_matches_the_cpu_decoder(hymenoptera: Path) -> None:
    paths = _photos(hymenoptera, 8)
    jpegs = [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) for path in paths]
    on_gpu = decode_jpegs(jpegs, torch.device("cuda"))
    on_cpu = decode_jpegs(jpegs, torch.device("cpu"))
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu is not None and cpu is not None and gpu.shape == cpu.shape
        assert (gpu.cpu().int() - cpu.int()).abs().float().mean() < 1.0


def test_a_jpeg_neither_decoder_reads_is_replaced_and_reported(tmp_path: Path, hymenoptera: Path) -> None:
    source = _photos(hymenoptera, 1)[0]
    Image.open(source).convert("RGB").save(tmp_path / "a.jpg")
    data = source.read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[: len(data) // 4])  # its header opens, its data is cut
    paths = find_images(tmp_path)
    assert device_decodable(paths[1].read_bytes())[0]
    batches = DeviceDecodedBatches(RawFiles(paths, 64, labels=[0, 1]), _order(2, 2), "cpu", workers=0)
    (batch,) = list(batches)
    assert batch.bad == [1]
    assert batch.indices.tolist() == [0, 0] and batch.labels is not None and batch.labels.tolist() == [0, 0]
    assert torch.equal(batch.images[0], batch.images[1])
