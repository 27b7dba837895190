"""ImageNet ResNet weights for MODEL.BACKBONE.WEIGHTS: detectron2's MSRA ``R-50.pkl`` or a torchvision ``.pth``.

Two kinds of file, two conventions (`CONVENTIONS`):

- **MSRA** (``ImageNetPretrained/MSRA/R-50.pkl``, R-101.pkl): a pickle, written by Python 2, of caffe2 blob names →
  numpy arrays (``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch2a_w``, ``res2_0_branch1_bn_b``, ``fc1000_w`` …),
  sometimes under a ``"blobs"`` key; the classifier, ``*_momentum`` and a ~0 ``conv1_b`` are dropped. The networks
  were trained on BGR input in 0..255 minus the pixel mean (std 1), with the stride of each downsampling block in its
  1x1 conv. Their norm layers are affine only (scale ``_bn_s``, bias ``_bn_b``): as detectron2 does for these files,
  the running mean is 0 and the running variance 1, so the FrozenBN computes ``s · x / sqrt(1 + eps) + b``.
- **torchvision** (``resnet50-0676ba61.pth``, IMAGENET1K_V1, or V2): a state dict read with
  ``torch.load(weights_only=True)``, trained on RGB input in 0..1 normalised by the ImageNet mean and std (×255 here,
  as images arrive in 0..255), with the stride in the 3x3 conv.

The pickle is read by `NumpyOnlyUnpickler`, which rebuilds numpy arrays and plain containers and refuses every
other global, so a tampered file cannot run code. Both kinds end up as torchvision parameter names (the names our
`ResNet` keeps); the classifier (``fc``) is dropped. `save_pretrained_resnet` writes them as a pickle-free ``.pth``
that records its convention.
"""

from __future__ import annotations

import codecs
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from ovd.modeling.backbone import STAGE_DEPTHS, ResNet
from ovd.utils.io import atomic_path

try:  # numpy >= 2 moved the internals that pickles name; files written by numpy 1 name numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


@dataclass(frozen=True)
class Convention:
    """What input and architecture a kind of ImageNet weights was trained with, as config values."""

    stride_in_1x1: bool
    input_format: str
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]


CONVENTIONS = {
    "MSRA": Convention(True, "BGR", (103.530, 116.280, 123.675), (1.0, 1.0, 1.0)),
    "torchvision": Convention(False, "RGB", (123.675, 116.280, 103.530), (58.395, 57.120, 57.375)),
}


@dataclass
class PretrainedResNet:
    """ImageNet ResNet weights under torchvision names (``conv1.weight``, ``layer1.0.bn1.running_var`` …), no fc."""

    state: dict[str, Tensor]
    convention: str  # a key of CONVENTIONS
    path: str


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global other than the numpy types that rebuild arrays."""


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, "latin1"); no other codec is needed
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}: only latin1 rebuilds bytes")
    return codecs.encode(text, "latin1")


# Everything a pickle of numpy arrays (Python 2 or 3, protocol 0 to 5) needs, and nothing else.
_NUMPY_GLOBALS = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _multiarray._reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _multiarray.scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numeric._frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): OrderedDict,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers/scalars; any other global raises `UnsafePickleError`."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 str (array bytes) → str, as numpy expects

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle the global {module}.{name}: only numpy arrays and plain containers are accepted "
                f"(a weights file never needs {module}.{name}; the file may have been tampered with)"
            ) from None


def load_numpy_pickle(path: str | Path) -> Any:
    """The object pickled in ``path``, which may hold only numpy arrays, dicts, lists, strings and numbers."""
    try:
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"MODEL.BACKBONE.WEIGHTS: file not found: {path}") from None
    except UnsafePickleError as e:
        raise UnsafePickleError(f"MODEL.BACKBONE.WEIGHTS {path}: {e}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"MODEL.BACKBONE.WEIGHTS {path}: not a readable pickle ({type(e).__name__}: {e})") from None


_C2_NORM = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_C2_BRANCH = {"1": ("downsample.0", "downsample.1"), "2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"),
              "2c": ("conv3", "bn3")}
_C2_STEM = re.compile(r"conv1_(?P<w>w)|res_conv1_bn_(?P<bn>s|b|rm|riv)")
_C2_BLOCK = re.compile(r"res(?P<stage>[2-5])_(?P<block>\d+)_branch(?P<branch>1|2[abc])_"
                       r"(?:(?P<w>w)|bn_(?P<bn>s|b|rm|riv))")
# The ImageNet classifier, optimiser state, and the stem conv's bias: the MSRA files carry a conv1_b of ~1e-9 that
# the network has no place for (detectron2 leaves it unused too).
_C2_IGNORED = re.compile(r"fc1000_[wb]|pred_[wb]|.+_momentum|conv1_b")


def _torchvision_name(blob: str) -> str | None:
    """``res3_0_branch1_bn_s`` → ``layer2.0.downsample.1.weight``; None for a name that is not a ResNet blob."""
    if m := _C2_STEM.fullmatch(blob):
        conv, norm = "conv1", "bn1"
    elif m := _C2_BLOCK.fullmatch(blob):
        prefix = f"layer{int(m['stage']) - 1}.{int(m['block'])}."
        conv, norm = (prefix + part for part in _C2_BRANCH[m["branch"]])
    else:
        return None
    return f"{conv}.weight" if m["w"] else f"{norm}.{_C2_NORM[m['bn']]}"


def caffe2_to_torchvision(blobs: dict[str, np.ndarray], *, source: str) -> dict[str, Tensor]:
    """Caffe2 ResNet blobs → a torchvision-named state dict, with running mean 0 / variance 1 where the file has no
    statistics (detectron2's reading of the MSRA files). Raises ValueError naming blobs that are not ResNet weights."""
    state, unknown = {}, []
    for blob, value in blobs.items():
        if _C2_IGNORED.fullmatch(blob):
            continue
        name = _torchvision_name(blob)
        if name is None:
            unknown.append(blob)
            continue
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            kind = f"an array of {value.dtype}" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
            raise ValueError(f"MODEL.BACKBONE.WEIGHTS {source}: blob {blob} holds {kind}, "
                             "expected a numeric numpy array")
        state[name] = torch.tensor(value)
    if unknown:
        raise ValueError(
            f"MODEL.BACKBONE.WEIGHTS {source}: {len(unknown)} blobs are not caffe2 ResNet weights: "
            f"{_first(sorted(unknown))} (expected names like conv1_w, res_conv1_bn_s, res2_0_branch2a_w, "
            "res2_0_branch1_bn_b)"
        )
    for bias in [k for k in state if k.endswith(".bias")]:  # ResNet convs have no bias: each is a norm layer's
        norm = bias[: -len("bias")]
        state.setdefault(norm + "running_mean", torch.zeros_like(state[bias]))
        state.setdefault(norm + "running_var", torch.ones_like(state[bias]))
    return state


def read_msra_pickle(path: str | Path) -> PretrainedResNet:
    """detectron2's ImageNetPretrained/MSRA ``R-50.pkl`` (caffe2 blobs, optionally under ``"blobs"``)."""
    data = load_numpy_pickle(path)
    if isinstance(data, dict) and "blobs" in data:
        data = data["blobs"]
    if isinstance(data, dict) and "model" in data and "__author__" in data:
        raise ValueError(
            f"MODEL.BACKBONE.WEIGHTS {path} is a detectron2-format pickle (author {data['__author__']!r}), not caffe2 "
            "ImageNet blobs: give the original file instead (the MSRA R-50.pkl, or torchvision's .pth)"
        )
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"MODEL.BACKBONE.WEIGHTS {path}: expected a dict of caffe2 blob names -> numpy arrays, "
                         f"got {type(data).__name__}")
    return PretrainedResNet(caffe2_to_torchvision(data, source=str(path)), "MSRA", str(path))


def read_torchvision_resnet(path: str | Path) -> PretrainedResNet:
    """A torchvision ResNet state dict, or a file of `save_pretrained_resnet` (which records its convention)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"MODEL.BACKBONE.WEIGHTS: file not found: {path}") from None
    except Exception as e:  # truncated zip, not a torch file, a pickled object that weights_only refuses
        reason = (str(e).strip().splitlines() or [""])[0]  # weights_only errors go on with advice to load unsafely
        raise ValueError(
            f"MODEL.BACKBONE.WEIGHTS {path}: not a readable torch state dict ({type(e).__name__}: {reason})"
        ) from None
    convention = "torchvision"
    if isinstance(data, dict) and "model" in data and "__author__" in data:
        convention, data = data["__author__"], data["model"]
        if convention not in CONVENTIONS:
            raise ValueError(f"MODEL.BACKBONE.WEIGHTS {path}: __author__ {convention!r} names no known convention; "
                             f"expected one of {sorted(CONVENTIONS)}")
    if not isinstance(data, dict) or "conv1.weight" not in data \
            or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"MODEL.BACKBONE.WEIGHTS {path}: expected a torchvision ResNet state dict "
                         "(conv1.weight, bn1.*, layer1.0.conv1.weight ...)")
    return PretrainedResNet({k: v for k, v in data.items() if not k.startswith("fc.")}, convention, str(path))


def read_pretrained_resnet(path: str | Path) -> PretrainedResNet:
    """ImageNet ResNet weights from ``path``: a torch file (zip, or ``.pth``/``.pt``) as torchvision's, a ``.pkl``
    as detectron2's MSRA caffe2 blobs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MODEL.BACKBONE.WEIGHTS: file not found: {path}")
    if zipfile.is_zipfile(path) or path.suffix in (".pth", ".pt"):
        return read_torchvision_resnet(path)
    if path.suffix == ".pkl":
        return read_msra_pickle(path)
    raise ValueError(f"MODEL.BACKBONE.WEIGHTS {path}: unknown kind of file; expected a torchvision state dict "
                     "(.pth/.pt) or detectron2's MSRA caffe2 pickle (.pkl)")


def save_pretrained_resnet(weights: PretrainedResNet, path: str | Path) -> None:
    """Write ``weights`` as a ``.pth`` that `read_pretrained_resnet` reads back with its convention, no pickle."""
    with atomic_path(path) as tmp:
        torch.save({"model": weights.state, "__author__": weights.convention}, tmp)


def _first(items: list[str], n: int = 10) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def check_input_conventions(
    weights: PretrainedResNet,
    *,
    stride_in_1x1: bool,
    input_format: str,
    pixel_mean: list[float],
    pixel_std: list[float],
) -> None:
    """Raise ValueError naming the config keys to set when the model would not feed ``weights`` the input (channel
    order, scale) or the block layout (stride in the 1x1 or the 3x3 conv) they were trained with."""
    want = CONVENTIONS[weights.convention]
    wrong = []
    if stride_in_1x1 != want.stride_in_1x1:
        wrong.append(("MODEL.RESNETS.STRIDE_IN_1X1", str(stride_in_1x1).lower(), str(want.stride_in_1x1).lower()))
    if input_format != want.input_format:
        wrong.append(("INPUT.FORMAT", input_format, want.input_format))
    # the mean within 2 grey levels (detectron1's 102.98/115.95/122.77 pass), the std within 5%
    if len(pixel_mean) != 3 or not np.allclose(pixel_mean, want.pixel_mean, rtol=0, atol=2.0):
        wrong.append(("MODEL.PIXEL_MEAN", list(pixel_mean), list(want.pixel_mean)))
    if len(pixel_std) != 3 or not np.allclose(pixel_std, want.pixel_std, rtol=0.05, atol=0):
        wrong.append(("MODEL.PIXEL_STD", list(pixel_std), list(want.pixel_std)))
    if wrong:
        raise ValueError(
            f"MODEL.BACKBONE.WEIGHTS {weights.path} holds {weights.convention} ImageNet weights, trained on "
            f"{want.input_format} input with mean {list(want.pixel_mean)} and std {list(want.pixel_std)} and the "
            f"stride in the {'1x1' if want.stride_in_1x1 else '3x3'} conv; the config differs: "
            + "; ".join(f"{key} is {got}, expected {exp}" for key, got, exp in wrong)
            + ". Set " + " ".join(f"{key} {exp}" for key, _, exp in wrong)
        )


def _stage_depths(keys: set[str]) -> tuple[int, ...]:
    return tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))


def load_pretrained_resnet(weights: PretrainedResNet, *, body: ResNet, res5: nn.Module | None = None) -> None:
    """Copy ``weights`` into ``body`` (stem, layer1 …) and ``res5`` (the C4 RoI head's stage, ``layer4`` in the file).

    Raises ValueError naming the missing, unexpected and mis-shaped keys when the file does not fit the ResNet.
    BatchNorm's ``num_batches_tracked`` is neither required nor loaded.
    """
    targets = dict(body.state_dict())
    if res5 is not None:
        targets.update({f"layer4.{k}": v for k, v in res5.state_dict().items()})
    want = {k for k in targets if not k.endswith("num_batches_tracked")}
    have = {k for k in weights.state if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(want - have), sorted(have - want)
    shapes = [(k, list(weights.state[k].shape), list(targets[k].shape)) for k in sorted(want & have)
              if weights.state[k].shape != targets[k].shape]
    if missing or unexpected or shapes:
        lines = [f"MODEL.BACKBONE.WEIGHTS {weights.path} ({weights.convention}) does not fit the ResNet of "
                 f"MODEL.RESNETS (DEPTH {body.depth}, NORM {body.norm}):"]
        if missing:
            lines.append(f"  missing keys: {_first(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_first(unexpected)}")
        lines += [f"  {k}: file shape {got}, model shape {exp}" for k, got, exp in shapes[:10]]
        blocks = _stage_depths(have)
        if blocks != STAGE_DEPTHS.get(body.depth):
            bottleneck = any(".conv3." in k for k in have)
            depth = [d for d, b in STAGE_DEPTHS.items() if b == blocks and (d >= 50) == bottleneck]
            lines.append(f"  the file's stages have {'/'.join(map(str, blocks))} blocks"
                         + (f": a ResNet-{depth[0]}, set MODEL.RESNETS.DEPTH {depth[0]}" if depth else ""))
        raise ValueError("\n".join(lines))
    with torch.no_grad():
        for k in want:
            targets[k].copy_(weights.state[k])
