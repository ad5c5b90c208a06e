"""The leakage guard: perceptual copies, what a run.json says a model saw, and the hash cache."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelfew.data import image_hashes
from labelfew.data.image_hashes import HashCache, near_copies, perceptual_hashes, thumbnail
from labelfew.data.images import find_images
from labelfew.data.overlap import BANK, guard, seen_in_training
from labelfew.errors import UserError


def dct_reference(square: np.ndarray) -> np.ndarray:
    """The orthonormal 2-D DCT-II written out as its double sum (what scipy.fft.dctn(norm="ortho") gives)."""
    size = square.shape[0]
    out = np.zeros((size, size))
    scale = [np.sqrt(1 / size)] + [np.sqrt(2 / size)] * (size - 1)
    for u, v in itertools.product(range(8), range(8)):  # only the 8 × 8 the hash uses
        total = 0.0
        for x, y in itertools.product(range(size), range(size)):
            total += (
                square[x, y]
                * np.cos(np.pi * (2 * x + 1) * u / (2 * size))
                * np.cos(np.pi * (2 * y + 1) * v / (2 * size))
            )
        out[u, v] = scale[u] * scale[v] * total
    return out


def test_the_perceptual_hash_is_the_median_split_of_the_low_dct_coefficients() -> None:
    square = np.random.default_rng(0).uniform(0, 255, size=(32, 32))
    low = dct_reference(square)[:8, :8].ravel()
    bits = low > np.median(low)
    expected = sum(1 << index for index, bit in enumerate(bits) if bit)
    assert int(perceptual_hashes(square[None])[0]) == expected


@pytest.fixture(scope="module")
def photos(hymenoptera: Path) -> list[Path]:
    return find_images(hymenoptera / "val")


def _copy(source: Path, destination: Path, quality: int, scale: float = 1.0) -> Path:
    with Image.open(source) as image:
        image = image.convert("RGB")
        if scale != 1.0:
            image = image.resize(
                (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
            )
        image.save(destination, quality=quality)
    return destination


def test_re_encoded_and_resized_copies_are_found(photos: list[Path], tmp_path: Path) -> None:
    originals = photos[:20]
    copies = [_copy(path, tmp_path / f"q40-{path.name}", quality=40) for path in originals[:10]]
    copies += [_copy(path, tmp_path / f"half-{path.name}", quality=85, scale=0.5) for path in originals[10:]]
    cache = HashCache(None)
    assert near_copies(cache.hashes(copies), cache.hashes(originals)).all()
    assert all(path.read_bytes() != copy.read_bytes() for path, copy in zip(originals, copies, strict=True))


def test_distinct_photos_are_not_copies(photos: list[Path]) -> None:
    """Every pair of the 153 validation photos (11,628 pairs): none is taken for a copy of another."""
    cache = HashCache(None)
    for index, path in enumerate(photos[:-1]):
        found = near_copies(cache.hashes([path]), cache.hashes(photos[index + 1 :]))
        assert not found.any(), path


def test_the_cache_reads_unchanged_files_and_rehashes_changed_ones(
    photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [Path(shutil.copy(path, folder / path.name)) for path in photos[:3]]
    first = HashCache(tmp_path / "hashes.npz").hashes(paths)
    HashCache(tmp_path / "hashes.npz").hashes(paths)  # nothing added: nothing written
    cache = HashCache(tmp_path / "hashes.npz")
    cache.hashes(paths)
    cache.save()
    decoded: list[Path] = []
    monkeypatch.setattr(image_hashes, "thumbnail", lambda path: decoded.append(path) or thumbnail(path))
    _copy(photos[5], paths[0], quality=90)  # another picture under the same name: size and mtime change
    again = HashCache(tmp_path / "hashes.npz").hashes(paths)
    assert decoded == [paths[0].resolve()]
    assert again.sha[1:] == first.sha[1:] and again.sha[0] != first.sha[0]
    assert (again.picture[1:] == first.picture[1:]).all()


def test_an_unreadable_cache_is_ignored(photos: list[Path], tmp_path: Path) -> None:
    (tmp_path / "hashes.npz").write_bytes(b"not an npz file")
    assert HashCache(tmp_path / "hashes.npz").hashes(photos[:1]).decoded.all()


# --- what a model saw, read from run.json files written by hand ---------------------------------


def _run_json(folder: Path, record: dict[str, object]) -> Path:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(record))
    return folder / "model.safetensors"


@pytest.fixture
def run_with_unlabeled(photos: list[Path], tmp_path: Path) -> dict[str, Path]:
    """pretrain on pool/, a FixMatch finetune with --unlabeled extra/, a distill with --unlabeled more/."""
    for name, chosen in (
        ("pool", photos[:10]),
        ("extra", photos[10:20]),
        ("more", photos[20:30]),
        ("test", photos[30:40]),
    ):
        (tmp_path / name).mkdir()
        for path in chosen:
            shutil.copy(path, tmp_path / name / path.name)
    run = tmp_path / "run"
    backbone = _run_json(
        run / "pretrain", {"stage": "pretrain", "config": {"data": str(tmp_path / "pool")}}
    ).with_name("backbone.safetensors")
    tuned = _run_json(run / "ft-auto", {
        "stage": "finetune", "method": "fixmatch", "parent": {"path": str(backbone)},
        "config": {"unlabeled": str(tmp_path / "extra")}, "data": {"unlabeled": str(tmp_path / "extra")},
        "labels": {"path": str(tmp_path / "absent.csv"), "content_sha256": ["0" * 16]},
    })  # fmt: skip
    distilled = _run_json(run / "distill-x", {
        "stage": "distill", "parent": {"path": str(tuned)}, "data": {"unlabeled": str(tmp_path / "more")},
    })  # fmt: skip
    return {
        "work": tmp_path,
        "backbone": backbone,
        "tuned": tuned,
        "distilled": distilled,
        "test": tmp_path / "test",
    }


def test_seen_in_training_follows_the_parents(run_with_unlabeled: dict[str, Path]) -> None:
    work = run_with_unlabeled["work"]
    folders = {seen.folder for seen in seen_in_training(run_with_unlabeled["distilled"]) if seen.folder}
    assert folders == {work / "pool", work / "extra", work / "more"}


@pytest.mark.parametrize(("folder", "name"), [("pool", "the pretraining folder"), ("extra", "the --unlabeled folder"),
                                              ("more", "the --unlabeled folder")])  # fmt: skip
def test_a_test_image_in_any_folder_a_model_saw_is_refused(
    run_with_unlabeled: dict[str, Path], folder: str, name: str
) -> None:
    work, test = run_with_unlabeled["work"], find_images(run_with_unlabeled["test"])
    _copy(test[0], work / folder / "re-encoded.jpg", quality=50, scale=0.75)  # not byte-identical
    models = [run_with_unlabeled["tuned"], run_with_unlabeled["distilled"]]
    with pytest.raises(UserError, match=rf"1 test image\(s\) are also in {name} .*{folder}.*--allow-overlap"):
        guard(test, None, run_with_unlabeled["backbone"], models, allow=False, cache_file=work / "hashes.npz")
    leaks = guard(
        test, None, run_with_unlabeled["backbone"], models, allow=True, cache_file=work / "hashes.npz"
    )
    assert [item.count for item in leaks.overlaps] == [1]
    expected_seen = {"pool": (1, 1, 1), "extra": (0, 1, 1), "more": (0, 0, 1)}[folder]
    keys = [str(run_with_unlabeled[key]) for key in ("backbone", "tuned", "distilled")]
    assert tuple(leaks.seen[key] for key in keys) == expected_seen
    assert leaks.seen[BANK] == 0
    assert leaks.unchecked == []  # the fine-tuning labels are gone, but their recorded hashes stand in


def test_a_copy_of_all_test_images_in_the_unlabeled_folder_is_refused(
    run_with_unlabeled: dict[str, Path],
) -> None:
    work, test = run_with_unlabeled["work"], find_images(run_with_unlabeled["test"])
    for path in test:
        shutil.copy(path, work / "extra" / f"copy-{path.name}")
    with pytest.raises(UserError, match=r"10 test image\(s\) are also in the --unlabeled folder"):
        guard(test, None, None, [run_with_unlabeled["tuned"]], allow=False, cache_file=None)


def test_a_folder_that_is_gone_is_said(run_with_unlabeled: dict[str, Path]) -> None:
    work, test = run_with_unlabeled["work"], find_images(run_with_unlabeled["test"])
    shutil.rmtree(work / "more")
    leaks = guard(test, None, None, [run_with_unlabeled["distilled"]], allow=False, cache_file=None)
    assert any("more" in line and "no longer exists" in line for line in leaks.unchecked)


def test_a_first_pass_over_many_images_is_announced_and_the_second_reads_the_cache(
    run_with_unlabeled: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from labelfew.data import overlap

    monkeypatch.setattr(overlap, "SAY_ABOVE", 5)
    work, test = run_with_unlabeled["work"], find_images(run_with_unlabeled["test"])
    said: list[str] = []
    guard(
        test,
        None,
        run_with_unlabeled["backbone"],
        [],
        allow=False,
        cache_file=work / "h.npz",
        say=said.append,
    )
    assert said == [
        f"hashing 10 images of the test set for the leakage guard (once: they are cached in {work / 'h.npz'})",
        f"hashing 10 images of the pretraining folder {work / 'pool'} (pretrain) for the leakage guard "
        f"(once: they are cached in {work / 'h.npz'})",
    ]
    said.clear()
    guard(
        test,
        None,
        run_with_unlabeled["backbone"],
        [],
        allow=False,
        cache_file=work / "h.npz",
        say=said.append,
    )
    assert said == []
