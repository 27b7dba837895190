"""ImageNet backbone weights (MODEL.BACKBONE.WEIGHTS): detectron2's MSRA R-50.pkl and torchvision .pth files.

The MSRA file is faked from a randomly initialised torchvision resnet50 renamed to caffe2 blob names by a mapping
written here, independently of the one in `ovd.modeling.pretrained`, and pickled the way Python 2 wrote the real
file (str as BINSTRING, numpy's module as numpy.core).
"""

from __future__ import annotations

import builtins
import codecs
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from ovd.config import load_config
from ovd.modeling.backbone import ResNet
from ovd.modeling.build import build_model
from ovd.modeling.pretrained import (
    UnsafePickleError,
    check_input_conventions,
    load_pretrained_resnet,
    read_pretrained_resnet,
)
from tools_loader import load_tool

ROOT = Path(__file__).resolve().parents[1]
C4 = ROOT / "configs/coco/Base-OVD-RCNN-C4.yaml"
FPN = ROOT / "configs/lvis/Base-OVD-RCNN-FPN.yaml"
TORCHVISION_INPUT = ["MODEL.RESNETS.STRIDE_IN_1X1", "false", "INPUT.FORMAT", "RGB",
                     "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]", "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]"]
MSRA_INPUT = dict(stride_in_1x1=True, input_format="BGR", pixel_mean=[103.53, 116.28, 123.675],
                  pixel_std=[1.0, 1.0, 1.0])

_BN = {"weight": "bn_s", "bias": "bn_b"}  # the MSRA files keep no running statistics
_BRANCH = {"conv1": "branch2a", "bn1": "branch2a", "conv2": "branch2b", "bn2": "branch2b", "conv3": "branch2c",
           "bn3": "branch2c", "downsample.0": "branch1", "downsample.1": "branch1"}


def caffe2_name(name: str) -> str | None:
    """torchvision name -> caffe2 blob name of the MSRA files; None for what they do not store."""
    *module, param = name.split(".")
    if module == ["fc"]:
        return f"fc1000_{param[0]}"
    if module == ["conv1"]:
        return "conv1_w"
    if module == ["bn1"]:
        return f"res_conv1_{_BN[param]}" if param in _BN else None
    layer, block, *sub = module
    blob = f"res{int(layer[-1]) + 1}_{block}_{_BRANCH['.'.join(sub)]}_"
    if sub[0].startswith("conv") or sub == ["downsample", "0"]:
        return blob + "w"
    return blob + _BN[param] if param in _BN else None


def randomised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every float entry random, so a swapped or transposed mapping cannot go unnoticed."""
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}


def caffe2_blobs(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    blobs = {caffe2_name(k): v.numpy() for k, v in state.items() if caffe2_name(k)}
    blobs["conv1_w_momentum"] = np.zeros(3, np.float32)  # optimiser state, ignored
    blobs["conv1_b"] = np.full(blobs["conv1_w"].shape[0], 1e-9, np.float32)  # the real files carry a ~0 stem bias
    return blobs


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as the MSRA files hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_msra_pickle(path: Path, blobs: dict[str, np.ndarray], *, python2: bool = True) -> Path:
    if python2:
        buf = io.BytesIO()
        Python2Pickler(buf, protocol=2).dump({k.encode(): v for k, v in blobs.items()})
        # numpy >= 2 names its internals numpy._core; the Python 2 files name numpy.core
        old, new = b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
        data = buf.getvalue().replace(old, new)
        assert new in data and old not in data
    else:
        data = pickle.dumps({"blobs": blobs}, protocol=5)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def resnet50_state() -> dict[str, torch.Tensor]:
    return randomised(torchvision.models.resnet50(weights=None).state_dict())


def tiny_resnet(depth: int = 50) -> ResNet:
    return ResNet(depth=depth, stem_out_channels=8, res2_out_channels=16, width_per_group=4, last_stage="res5")


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return randomised(tiny_resnet().state_dict())


def build(config: Path, weights: Path, *overrides: str):
    cfg = load_config(config, ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.WEIGHTS", str(weights),
                               "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM", "8", *overrides])
    return build_model(cfg, text_embeds=torch.nn.functional.normalize(torch.randn(3, 8), dim=1),
                       class_image_counts=torch.ones(3))


def loaded_backbone(model) -> dict[str, torch.Tensor]:
    """Body and (C4) res5 entries under torchvision names."""
    state = dict(model.backbone.body.state_dict())
    res5 = getattr(model.roi_heads.box_head, "res5", None)
    if res5 is not None:
        state.update({f"layer4.{k}": v for k, v in res5.state_dict().items()})
    return state


# ---- the two kinds of file land exactly ---------------------------------------------------------------------------

@pytest.mark.parametrize("config, python2", [(C4, True), (FPN, False)], ids=["c4-python2-pickle", "fpn-py3-blobs"])
def test_msra_pickle_lands_exactly(tmp_path, resnet50_state, config, python2):
    path = write_msra_pickle(tmp_path / "R-50.pkl", caffe2_blobs(resnet50_state), python2=python2)
    got = loaded_backbone(build(config, path))
    expected = {k: v for k, v in resnet50_state.items() if not k.startswith("fc.") and "num_batches" not in k}
    for k, v in expected.items():
        if k.endswith("running_mean"):
            v = torch.zeros_like(v)  # FrozenBN of an affine-only MSRA norm: mean 0, variance 1 (as detectron2)
        elif k.endswith("running_var"):
            v = torch.ones_like(v)
        assert torch.equal(got[k], v), k
    assert set(got) == set(expected) and len(expected) == 53 + 53 * 4  # 53 convs, each with a norm of 4 entries


def test_torchvision_file_lands_exactly(tmp_path, resnet50_state):
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(resnet50_state, path)
    got = loaded_backbone(build(C4, path, *TORCHVISION_INPUT))
    expected = {k: v for k, v in resnet50_state.items() if not k.startswith("fc.") and "num_batches" not in k}
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_trainable_bn_keeps_its_batch_counter(tmp_path, tiny_state):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_state, path)
    body = ResNet(depth=50, norm="BN", stem_out_channels=8, res2_out_channels=16, width_per_group=4, last_stage="res5")
    load_pretrained_resnet(read_pretrained_resnet(path), body=body)
    assert torch.equal(body.layer1[0].bn2.running_var, tiny_state["layer1.0.bn2.running_var"])
    assert body.bn1.num_batches_tracked.item() == 0


def test_converted_pickle_round_trips_with_its_convention(tmp_path, tiny_state, capsys):
    pkl = write_msra_pickle(tmp_path / "R-50.pkl", caffe2_blobs(tiny_state))
    load_tool("convert_pretrained_backbone").main([str(pkl), str(tmp_path / "R-50.pth")])
    assert "MODEL.RESNETS.STRIDE_IN_1X1 true INPUT.FORMAT BGR" in capsys.readouterr().out
    original, converted = read_pretrained_resnet(pkl), read_pretrained_resnet(tmp_path / "R-50.pth")
    assert converted.convention == original.convention == "MSRA"
    assert original.state.keys() == converted.state.keys()
    assert all(torch.equal(original.state[k], converted.state[k]) for k in original.state)
    with pytest.raises(ValueError, match="R-50.pth holds MSRA ImageNet weights.*INPUT.FORMAT is RGB, expected BGR"):
        check_input_conventions(converted, **{**MSRA_INPUT, "input_format": "RGB"})


# ---- files that run code are refused without running it ------------------------------------------------------------

class RunsCode:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("payload, protocol, refused", [
    (lambda marker: RunsCode(os.system, f"touch {marker}"), 2, f"{os.system.__module__}.system"),
    (lambda marker: RunsCode(builtins.eval, f"open({str(marker)!r}, 'w')"), 4, "builtins.eval"),
    # protocol 2 names builtins as Python 2 did; the message names the global as the file does
    (lambda marker: {"conv1_w": np.zeros(3, np.float32),
                     "res2_0_branch2a_w": RunsCode(builtins.exec, f"open({str(marker)!r}, 'w')")}, 2, "__builtin__.exec"),
    (lambda marker: {"conv1_w": RunsCode(codecs.encode, f"open({str(marker)!r}, 'w')", "rot13")}, 2,
     "_codecs.encode with encoding 'rot13'"),
], ids=["os.system", "builtins.eval", "nested-exec", "codecs-not-latin1"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, payload, protocol, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps(payload(marker), protocol=protocol))
    with pytest.raises(UnsafePickleError) as err:
        read_pretrained_resnet(path)
    assert str(path) in str(err.value) and refused in str(err.value)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=refused):  # the same through the config
        build(C4, path)
    assert not marker.exists()


# ---- files that do not fit ---------------------------------------------------------------------------------------

def _tiny_pickle(tmp_path, tiny_state, edit) -> Path:
    blobs = caffe2_blobs(tiny_state)
    edit(blobs)
    return write_msra_pickle(tmp_path / "R-50.pkl", blobs)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.pop("res4_5_branch2c_w"), r"\(DEPTH 50, NORM FrozenBN\):\n  missing keys: layer3\.5\.conv3\.weight$"),
    (lambda b: b.update(conv1_w=np.zeros((8, 3, 3, 3), np.float32)),
     r"conv1\.weight: file shape \[8, 3, 3, 3\], model shape \[8, 3, 7, 7\]"),
    (lambda b: b.update(res2_0_branch2a_gn_s=np.ones(4, np.float32)),
     r"1 blobs are not caffe2 ResNet weights: res2_0_branch2a_gn_s \(expected names like conv1_w"),
    (lambda b: b.update(res2_0_branch2a_w="weights"), r"blob res2_0_branch2a_w holds a str, expected a numeric numpy"),
    (lambda b: b.update(res2_0_branch2a_w=np.array(["w"], dtype=object)), r"res2_0_branch2a_w holds an array of object"),
], ids=["missing", "wrong-shape", "unknown-blob", "not-an-array", "object-array"])
def test_a_pickle_that_does_not_fit_names_the_keys(tmp_path, tiny_state, edit, message):
    path = _tiny_pickle(tmp_path, tiny_state, edit)
    with pytest.raises(ValueError, match=message) as err:
        load_pretrained_resnet(read_pretrained_resnet(path), body=tiny_resnet())
    assert str(path) in str(err.value)


def test_a_deeper_resnet_is_named(tmp_path):
    path = tmp_path / "R-101.pkl"
    write_msra_pickle(path, caffe2_blobs(randomised(tiny_resnet(101).state_dict())))
    with pytest.raises(ValueError) as err:
        load_pretrained_resnet(read_pretrained_resnet(path), body=tiny_resnet(50))
    msg = str(err.value)
    assert "unexpected keys: layer3.10.bn1.bias" in msg and "(17 blocks" not in msg
    assert "the file's stages have 3/4/23/3 blocks: a ResNet-101, set MODEL.RESNETS.DEPTH 101" in msg
    assert "missing keys" not in msg


def test_a_torchvision_file_that_does_not_fit_names_the_keys(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if k != "layer1.0.bn1.running_var"}
    state["layer2.0.conv9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "r50.pth")
    weights = read_pretrained_resnet(tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"missing keys: layer1\.0\.bn1\.running_var\n  unexpected keys: layer2\.0\.conv9"):
        load_pretrained_resnet(weights, body=tiny_resnet())


@pytest.mark.parametrize("name, content, error, message", [
    ("w.npz", b"PK-not-really", ValueError, "w.npz: unknown kind of file; expected a torchvision state dict"),
    ("w.pkl", pickle.dumps([np.zeros(2)]), ValueError, "w.pkl: expected a dict of caffe2 blob names -> numpy arrays"),
    ("w.pkl", b"\x80\x02}q\x00(X", ValueError, "w.pkl: not a readable pickle"),
    ("w.pkl", pickle.dumps({"model": {}, "__author__": "torchvision"}), ValueError, "is a detectron2-format pickle"),
    ("w.pth", b"garbage", ValueError, "w.pth: not a readable torch state dict"),
    ("w.pth", None, ValueError, "w.pth: expected a torchvision ResNet state dict"),
    ("missing.pkl", "absent", FileNotFoundError, "MODEL.BACKBONE.WEIGHTS: file not found: .*missing.pkl"),
], ids=["extension", "not-a-dict", "truncated", "detectron2-format", "not-torch", "not-a-resnet", "missing"])
def test_unreadable_files_are_named(tmp_path, name, content, error, message):
    path = tmp_path / name
    if content is None:
        torch.save({"weight": torch.zeros(2)}, path)
    elif content != "absent":
        path.write_bytes(content)
    with pytest.raises(error, match=message):
        read_pretrained_resnet(path)


# ---- the file's conventions against the config ------------------------------------------------------------------

def test_torchvision_weights_with_the_msra_config_name_every_key_to_set(tmp_path, tiny_state):
    torch.save(tiny_state, tmp_path / "resnet50.pth")
    with pytest.raises(ValueError) as err:
        build(C4, tmp_path / "resnet50.pth")  # BGR, std 1, stride in 1x1: the MSRA setting
    msg = str(err.value)
    assert "resnet50.pth holds torchvision ImageNet weights" in msg
    assert msg.endswith(
        ". Set MODEL.RESNETS.STRIDE_IN_1X1 false INPUT.FORMAT RGB MODEL.PIXEL_MEAN [123.675, 116.28, 103.53] "
        "MODEL.PIXEL_STD [58.395, 57.12, 57.375]"
    )


def test_msra_weights_with_the_stride_in_3x3_are_refused(tmp_path, tiny_state):
    weights = read_pretrained_resnet(write_msra_pickle(tmp_path / "R-50.pkl", caffe2_blobs(tiny_state)))
    with pytest.raises(ValueError, match=r"MODEL.RESNETS.STRIDE_IN_1X1 is false, expected true\. "
                                         r"Set MODEL.RESNETS.STRIDE_IN_1X1 true$"):
        check_input_conventions(weights, **{**MSRA_INPUT, "stride_in_1x1": False})
    with pytest.raises(ValueError, match=r"MODEL.PIXEL_STD is \[58.4, 57.1, 57.4\], expected \[1.0, 1.0, 1.0\]"):
        check_input_conventions(weights, **{**MSRA_INPUT, "pixel_std": [58.4, 57.1, 57.4]})
    check_input_conventions(weights, **MSRA_INPUT)
    check_input_conventions(weights, **{**MSRA_INPUT, "pixel_mean": [102.9801, 115.9465, 122.7717]})  # Detectron1's
