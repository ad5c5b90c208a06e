"""`--init`: weights of other tools, timm and labelfew, read, matched to the backbone and checked."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from labelfew.engine.init_weights import load_init, read_init, read_timm
from labelfew.errors import UserError
from labelfew.models import build_backbone

ARCH = "test_resnet"


def _timm_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A whole timm model's state dict (classifier `fc.*` included), with seeded weights."""
    torch.manual_seed(seed)
    return {key: value.clone() for key, value in timm.create_model(ARCH, num_classes=7).state_dict().items()}


def _backbone_keys() -> list[str]:
    return list(build_backbone(ARCH, small_stem=False).state_dict())


def _assert_loads_exactly(init_tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    backbone = build_backbone(ARCH, small_stem=False)
    backbone.load_state_dict(init_tensors, strict=True)
    for key in _backbone_keys():
        assert torch.equal(backbone.state_dict()[key], reference[key]), key


def test_a_safetensors_file_of_a_timm_model_loads_its_backbone_and_skips_the_classifier(
    tmp_path: Path,
) -> None:
    state = _timm_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    init = read_init(str(tmp_path / "w.safetensors"), arch=ARCH)
    assert init.prefix == ""
    assert set(init.skipped) == {"fc.weight", "fc.bias"}
    _assert_loads_exactly(init.tensors, state)
    assert "2 (not in the backbone (classifier or head))" in init.summary()
    assert len(init.sha256) == 64


def test_a_pth_state_dict_under_a_backbone_prefix_is_found(tmp_path: Path) -> None:
    state = _timm_state(1)
    nested = {f"backbone.{key}": value for key, value in state.items() if not key.startswith("fc.")}
    nested["projection.0.weight"] = torch.zeros(3, 3)
    torch.save(nested, tmp_path / "ssl.pth")
    init = read_init(str(tmp_path / "ssl.pth"), arch=ARCH)
    assert init.prefix == "backbone."
    assert init.skipped == {"projection.0.weight": "outside 'backbone.'"}
    _assert_loads_exactly(init.tensors, state)


def test_a_moco_checkpoint_is_ambiguous_until_a_prefix_is_named(tmp_path: Path) -> None:
    query, key = _timm_state(2), _timm_state(3)
    checkpoint = {
        "epoch": 200,
        "state_dict": {
            **{f"module.encoder_q.{k}": v for k, v in query.items()},
            **{f"module.encoder_k.{k}": v for k, v in key.items()},
        },
    }
    torch.save(checkpoint, tmp_path / "moco.pth.tar.pth")
    with pytest.raises(
        UserError, match=r"several prefixes .*'state_dict\.module\.encoder_k\.'.*--init-prefix"
    ):
        read_init(str(tmp_path / "moco.pth.tar.pth"), arch=ARCH)
    init = read_init(str(tmp_path / "moco.pth.tar.pth"), arch=ARCH, prefix="state_dict.module.encoder_q.")
    _assert_loads_exactly(init.tensors, query)
    with pytest.raises(UserError, match=r"--init-prefix 'encoder_q\.': no key .* starts with it"):
        read_init(str(tmp_path / "moco.pth.tar.pth"), arch=ARCH, prefix="encoder_q.")


def test_a_file_without_an_architecture_needs_arch(tmp_path: Path) -> None:
    save_file(_timm_state(), str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match=r"does not say which architecture .* pass --arch"):
        read_init(str(tmp_path / "w.safetensors"))


def test_weights_of_another_architecture_are_refused_naming_keys(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "r10.pth")
    with pytest.raises(UserError, match=r"r10\.pth: \d+ tensors .*(missing|differ in shape).*check --arch"):
        read_init(str(tmp_path / "r10.pth"), arch=ARCH)


def test_a_shape_mismatch_and_a_channel_mismatch_each_get_their_line(tmp_path: Path) -> None:
    state = _timm_state()
    bad = dict(state)
    bad["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(UserError, match=r"1 tensors differ in shape .*layer1\.0\.conv1\.weight"):
        read_init(str(tmp_path / "shape.safetensors"), arch=ARCH)
    gray = dict(state)
    first = "conv1.0.weight"
    gray[first] = state[first][:, :1].clone()
    save_file(gray, str(tmp_path / "gray.safetensors"))
    with pytest.raises(UserError, match=r"conv1\.0\.weight takes 1 input channels, this model 3"):
        read_init(str(tmp_path / "gray.safetensors"), arch=ARCH)


def test_truncated_files_and_unsafe_pickles_are_refused(tmp_path: Path) -> None:
    save_file(_timm_state(), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.safetensors: not a readable safetensors file"):
        read_init(str(tmp_path / "cut.safetensors"), arch=ARCH)
    torch.save(_timm_state(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.pth: cannot be read as weights"):
        read_init(str(tmp_path / "cut.pth"), arch=ARCH)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"weights": _Unsafe()}, protocol=2))
    with pytest.raises(UserError, match=r"evil\.pt: .*Python objects.*weights_only"):
        read_init(str(tmp_path / "evil.pt"), arch=ARCH)
    with pytest.raises(UserError, match="no such file or folder"):
        read_init(str(tmp_path / "absent.pth"), arch=ARCH)


class _Unsafe:
    """Any class: a full unpickle would import and build it; weights_only refuses it."""


def test_unknown_timm_names_and_tags_are_refused() -> None:
    with pytest.raises(UserError, match="resnet999 is not a timm model"):
        read_init("timm:resnet999")
    with pytest.raises(UserError, match=r"no weights tagged .nope. for test_resnet .*r160_in1k"):
        read_init("timm:test_resnet.nope")


def test_timm_weights_load_through_timms_own_path_with_their_normalisation(tmp_path: Path) -> None:
    state = _timm_state(4)
    torch.save(state, tmp_path / "timm.pth")
    init = read_init("timm:test_resnet.r160_in1k", timm_overlay={"file": str(tmp_path / "timm.pth")})
    assert init.arch == ARCH and init.name == "test_resnet.r160_in1k"
    assert init.mean == (0.5, 0.5, 0.5) and init.std == (
        0.5,
        0.5,
        0.5,
    )  # timm's pretrained_cfg, not ImageNet's
    assert init.interpolation == "bilinear"
    _assert_loads_exactly(init.tensors, state)
    assert read_timm("test_resnet.r160_in1k", {"file": str(tmp_path / "timm.pth")}).sha256 == init.sha256


def test_offline_without_the_cache_is_one_line_naming_the_cache_and_the_command(tmp_path: Path) -> None:
    code = (
        "from labelfew.engine.init_weights import read_init\n"
        "from labelfew.errors import UserError\n"
        "try:\n    read_init('timm:test_resnet.r160_in1k')\n"
        "except UserError as error:\n    print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    line = result.stdout.strip()
    assert result.returncode == 0 and "\n" not in line, result.stderr
    assert str(tmp_path / "hf" / "hub") in line
    assert "timm.create_model('test_resnet.r160_in1k', pretrained=True)" in line


def test_load_init_is_strict_and_leaves_only_a_replaced_stem_random(tmp_path: Path) -> None:
    state = _timm_state(5)
    save_file(state, str(tmp_path / "w.safetensors"))
    init = read_init(str(tmp_path / "w.safetensors"), arch="test_resnet")
    backbone = build_backbone(ARCH, small_stem=False)
    assert load_init(backbone, init, small_stem=False) == []
    _assert_loads_exactly(dict(backbone.state_dict()), state)
    resnet = timm.create_model("resnet10t", num_classes=0).state_dict()  # a 3x3 deep stem: same shapes
    save_file(dict(resnet), str(tmp_path / "r10.safetensors"))
    small = build_backbone("resnet10t", small_stem=True)
    init = read_init(str(tmp_path / "r10.safetensors"), arch="resnet10t")
    assert load_init(small, init, small_stem=True) == []
    resnet18 = build_backbone("resnet18", small_stem=False).state_dict()
    save_file(dict(resnet18), str(tmp_path / "r18.safetensors"))
    init = read_init(str(tmp_path / "r18.safetensors"), arch="resnet18")
    small18 = build_backbone("resnet18", small_stem=True)
    assert load_init(small18, init, small_stem=True) == ["conv1.weight"]  # 7x7 into 3x3: stays random
    assert torch.equal(small18.state_dict()["layer4.1.bn2.weight"], resnet18["layer4.1.bn2.weight"])
