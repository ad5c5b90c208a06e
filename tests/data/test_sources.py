"""The two image sources: which one a run uses, and that they give the same batches and views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelfew import engine
from labelfew.data import sources
from labelfew.data.batches import Batch, EpochOrder
from labelfew.data.images import find_images
from labelfew.data.store import image_bytes
from labelfew.errors import UserError
from labelfew.views.config import ViewConfig
from labelfew.views.finetune import CropFlipViews
from labelfew.views.simclr import SimCLRViews


def _folder(root: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    for index, (height, width) in enumerate(sizes):
        pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{index:02d}.png")
    return find_images(root)


def test_auto_picks_the_store_when_the_decoded_images_fit(tmp_path: Path) -> None:
    paths = _folder(tmp_path, [(40, 60), (60, 40), (32, 32)])
    needed = sum(image_bytes(h, w, 32) for h, w in [(40, 60), (60, 40), (32, 32)])
    assert sources.augment_place("auto", needed / 2**30, paths, 32) == "device"
    assert sources.augment_place("auto", (needed - 1) / 2**30, paths, 32) == "workers"
    assert sources.augment_place("workers", 4.0, paths, 32) == "workers"
    assert sources.augment_place("device", 1e-9, paths, 32) == "device"  # decoding then fails clearly


@pytest.mark.parametrize(
    ("place", "budget", "message"),
    [("gpu", 4.0, "use one of auto, device, workers"), ("auto", 0.0, "give a positive size"),
     ("auto", -1.0, "give a positive size")],
)  # fmt: skip
def test_invalid_places_and_budgets_are_refused(
    tmp_path: Path, place: str, budget: float, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        sources.augment_place(place, budget, [], 32)


def _epochs(
    paths: list[Path], place: str, image_size: int, workers: int, labels: list[int] | None
) -> list[Batch]:
    """Two epochs (the second resumed at step 1) of 2 processes' batches from one source."""
    accelerator = engine.make_accelerator("no", seed=0)
    seen = []
    for rank in (0, 1):
        order = EpochOrder(len(paths), batch_size=3, seed=5, rank=rank, world_size=2)
        batches, undecodable = sources.training_batches(
            paths, place, image_size, order, accelerator, budget_gib=1.0, workers=workers, labels=labels
        )
        assert undecodable == []
        seen += list(batches)
        batches.set_epoch(1, first_step=1)
        seen += list(batches)
    return seen


def _assert_same(first: list[Batch], second: list[Batch], image_size: int) -> None:
    simclr, crop_flip = SimCLRViews(ViewConfig(image_size=image_size, blur=True)), CropFlipViews(image_size)
    assert len(first) == len(second) > 0
    for one, other in zip(first, second, strict=True):
        assert torch.equal(one.images, other.images) and torch.equal(one.sizes, other.sizes)
        assert torch.equal(one.indices, other.indices) and one.seed == other.seed
        assert (one.labels is None and other.labels is None) or torch.equal(one.labels, other.labels)  # type: ignore[arg-type]
        views = simclr(one.images, one.sizes, one.generator())
        again = simclr(other.images, other.sizes, other.generator())
        assert torch.equal(views[0], again[0]) and torch.equal(views[1], again[1])
        crops = crop_flip(one.images, one.sizes, one.generator())
        assert torch.equal(crops, crop_flip(other.images, other.sizes, other.generator()))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_seed_gives_the_same_views_from_either_source(tmp_path: Path, workers: int) -> None:
    """Bit for bit on the CPU: images of mixed sizes and orientations, 2 processes, a resumed epoch."""
    sizes = [(40, 56), (56, 40), (24, 30), (64, 64), (33, 47), (50, 20)] * 3
    paths = _folder(tmp_path, sizes)
    labels = [index % 3 for index in range(len(paths))]
    store = _epochs(paths, "device", 32, workers, labels)
    assert store[0].images.shape[2:] != (32, 32)  # whole images, padded: not squares
    _assert_same(store, _epochs(paths, "workers", 32, workers, labels), 32)


def test_the_same_views_from_either_source_on_real_photos(hymenoptera: Path) -> None:
    paths = find_images(hymenoptera / "train")[::12][:14]
    store = _epochs(paths, "device", 96, 0, None)
    assert max(int(batch.sizes.max()) for batch in store) > 110  # the longer sides are kept
    _assert_same(store, _epochs(paths, "workers", 96, 0, None), 96)


def test_decode_on_device_streams_and_is_refused_where_it_cannot_run(tmp_path: Path) -> None:
    paths = _folder(tmp_path, [(32, 32)])
    assert sources.augment_place("auto", 4.0, paths, 32, decode_on="device") == "workers"  # fits, but streams
    assert sources.augment_place("auto", 4.0, paths, 32, decode_on="cpu") == "device"
    sources.check_decode_on("device", "auto", torch.device("cuda"))  # nvJPEG there: accepted
    with pytest.raises(UserError, match="--decode-on device decodes JPEGs with nvJPEG on a CUDA GPU"):
        sources.check_decode_on("device", "workers", torch.device("cpu"))
    with pytest.raises(UserError, match="--augment-on device decodes every image once into memory"):
        sources.check_decode_on("device", "device", torch.device("cuda"))
    with pytest.raises(UserError, match="--decode-on gpu: use one of auto, cpu, device"):
        sources.check_decode_on("gpu", "auto", torch.device("cpu"))


def test_device_decoded_batches_are_the_cpu_streams_batches(tmp_path: Path) -> None:
    """`training_batches(decode_on="device")` on the CPU device: torchvision's decoder (nvJPEG's
    call on a GPU) gives the streaming source's batches, within the two JPEG decoders' rounding."""
    from labelfew.data.device_decode import DeviceDecodedBatches

    rows, columns = np.mgrid[0:48, 0:72]
    for index in range(6):
        pixels = np.stack([rows * 5 + index * 9, columns * 3, (rows + columns) * 2], axis=-1) % 256
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / f"{index}.jpg", quality=90)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "6.png")  # not a JPEG: decoded on the CPU
    paths = find_images(tmp_path)
    accelerator = engine.make_accelerator("no", seed=0)

    def batches(decode_on: str) -> tuple[object, list[Batch]]:
        order = EpochOrder(len(paths), batch_size=3, seed=5, drop_last=False)  # every file, the PNG too
        source, undecodable = sources.training_batches(
            paths, "workers", 32, order, accelerator, budget_gib=1.0, decode_on=decode_on
        )
        assert undecodable == []
        return source, list(source)

    device, on_device = batches("device")
    assert isinstance(device, DeviceDecodedBatches)
    _, on_cpu = batches("cpu")
    assert len(on_device) == len(on_cpu) == 3
    for expected, got in zip(on_cpu, on_device, strict=True):
        assert torch.equal(expected.indices, got.indices) and torch.equal(expected.sizes, got.sizes)
        assert expected.seed == got.seed
        difference = (expected.images.int() - got.images.int()).abs().float()
        assert difference.mean() < 1.0 and difference.max() <= 40
    assert sources.decode_record(device) == {"device_decoded": 6, "cpu_fallbacks": 1}
