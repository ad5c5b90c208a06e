"""The image sources at C != 3: the store, the stream and the device decoder's CPU path give the same
(B, C, H, W) batches of a grayscale folder and of a 4-channel one, as the decoder gives each file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from medical_images import deep_pixels, digits, multichannel_pixels, write_deep, write_multichannel_tiff

from labelfew.data.batches import EpochOrder
from labelfew.data.device_decode import DeviceDecodedBatches, RawFiles
from labelfew.data.pixels import decode_array
from labelfew.data.store import MemoryBatches, decode_images, estimate_decoded_bytes
from labelfew.data.stream import DecodedFiles, FilesInOrder, StreamBatches, collate_in_order
from labelfew.spec import Decoding


def _folder(root: Path, channels: int) -> list[Path]:
    """12 files of 12-bit gray PNG (channels 1) or 16-bit TIFF of `channels`, of two sizes."""
    paths = []
    for index, (image, _) in enumerate(digits(4, 3, 20)):
        image = image[: 14 + index % 2 * 6]  # 14 x 20 or 20 x 20
        if channels == 1:
            paths.append(write_deep(root / f"{index:02d}.png", deep_pixels(image, seed=index)))
        else:
            pixels = multichannel_pixels(image, channels, bits=12)
            paths.append(write_multichannel_tiff(root / f"{index:02d}.tif", pixels))
    return paths


@pytest.mark.parametrize("channels", [1, 4])
def test_store_and_stream_give_the_same_batches_of_c_channels(tmp_path: Path, channels: int) -> None:
    paths = _folder(tmp_path, channels)
    decoding = Decoding(channels, (0.0, 4095.0))
    store = decode_images(paths, side=16, decoding=decoding, workers=1)
    assert store.channels == channels and store.nbytes == estimate_decoded_bytes(paths, 16, channels=channels)
    order = EpochOrder(len(paths), batch_size=4, seed=2)
    stored = list(MemoryBatches(store, order, "cpu"))
    streamed = list(StreamBatches(DecodedFiles(paths, 16, decoding=decoding), order, "cpu", workers=0))
    device_path = list(DeviceDecodedBatches(RawFiles(paths, 16, decoding=decoding), order, "cpu", workers=0))
    assert len(stored) == len(streamed) == len(device_path) == 3
    for one, two, three in zip(stored, streamed, device_path, strict=True):
        assert one.images.shape[:2] == (4, channels)
        assert torch.equal(one.images, two.images) and torch.equal(one.images, three.images)
        assert torch.equal(one.sizes, two.sizes) and torch.equal(one.indices, two.indices)
    first = int(stored[0].indices[0])
    height, width = stored[0].sizes[0].tolist()
    expected = decode_array(paths[first], decoding)  # 20 px or less: stored as decoded
    assert torch.equal(stored[0].images[0, :, :height, :width], torch.from_numpy(expected).permute(2, 0, 1))


def test_an_empty_evaluation_batch_has_the_models_channels(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    items = [FilesInOrder([tmp_path / "bad.png"], 8, Decoding(channels=1))[0]]
    assert collate_in_order(items, channels=1).images.shape == (0, 1, 0, 0)
    assert items[0][1] is None and "bad.png" in items[0][2]


def test_the_device_decoder_leaves_jpegs_to_the_cpu_when_c_is_not_3(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg")
    item = RawFiles([tmp_path / "a.jpg"], 16, decoding=Decoding(channels=1))[0]
    assert item.jpeg is None and item.pixels is not None and item.pixels.shape == (12, 12, 1)
    assert RawFiles([tmp_path / "a.jpg"], 16)[0].jpeg is not None  # RGB: nvJPEG's
