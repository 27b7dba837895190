"""ResNet backbones (C4 and FPN) assembled from torchvision's blocks.

The stages keep torchvision's names (``conv1``, ``bn1``, ``layer1`` … ``layer4``) so torchvision ImageNet weights
load as they are. Widths, the norm layer and where the stride sits are arguments, which lets the same code
build detectron2's MSRA ResNets (stride in the 1x1 conv) and the tiny models of the parity fixtures.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

STAGE_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    """Norm layer factory: "FrozenBN" (eps 1e-5, as detectron2), "BN", "SyncBN" or "GN" (32 groups)."""
    if name == "FrozenBN":
        return lambda c: FrozenBatchNorm2d(c, eps=1e-5)
    if name == "BN":
        return nn.BatchNorm2d
    if name == "SyncBN":
        return nn.SyncBatchNorm
    if name == "GN":
        return lambda c: nn.GroupNorm(32, c)
    raise ValueError(f"MODEL.RESNETS.NORM: unknown norm {name!r}; expected one of FrozenBN, BN, SyncBN, GN")


def make_stage(
    *,
    depth: int,
    stage: int,
    in_channels: int,
    out_channels: int,
    bottleneck_channels: int,
    num_groups: int,
    stride: int,
    stride_in_1x1: bool,
    norm: str,
) -> nn.Sequential:
    """One ResNet stage (res2 is stage 0) of torchvision blocks, stride on its first block."""
    num_blocks = STAGE_DEPTHS[depth][stage]
    norm_fn = norm_layer(norm)
    bottleneck = depth >= 50
    expansion = Bottleneck.expansion if bottleneck else BasicBlock.expansion
    planes = out_channels // expansion
    blocks = []
    for i in range(num_blocks):
        s = stride if i == 0 else 1
        downsample = None
        if s != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=s, bias=False), norm_fn(out_channels)
            )
        if bottleneck:
            base_width = bottleneck_channels // num_groups * 64 // planes
            block = Bottleneck(in_channels, planes, s, downsample, num_groups, base_width, 1, norm_fn)
            if stride_in_1x1 and s != 1:
                block.conv1.stride, block.conv2.stride = (s, s), (1, 1)
        else:
            block = BasicBlock(in_channels, planes, s, downsample, 1, 64, 1, norm_fn)
        blocks.append(block)
        in_channels = out_channels
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """Stem and the stages up to ``last_stage``; ``forward`` returns the requested stage outputs by name."""

    def __init__(
        self,
        *,
        depth: int = 50,
        norm: str = "FrozenBN",
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        width_per_group: int = 64,
        num_groups: int = 1,
        stride_in_1x1: bool = True,
        out_features: tuple[str, ...] = ("res4",),
        last_stage: str = "res4",
    ) -> None:
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"MODEL.RESNETS.DEPTH: {depth} not supported; expected one of {sorted(STAGE_DEPTHS)}")
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown ResNet output feature(s) {unknown}; expected among {STAGE_NAMES}")
        self.depth, self.norm, self.stride_in_1x1 = depth, norm, stride_in_1x1
        self.num_groups = num_groups
        self.out_features = tuple(out_features)
        self.conv1 = nn.Conv2d(3, stem_out_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(norm)(stem_out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.res2_out_channels = res2_out_channels
        self.res2_bottleneck_channels = width_per_group * num_groups
        self.channels: dict[str, int] = {}
        in_c = stem_out_channels
        for i in range(STAGE_NAMES.index(last_stage) + 1):
            self.add_module(f"layer{i + 1}", self.build_stage(i, in_c))
            in_c = self.channels[STAGE_NAMES[i]] = res2_out_channels * 2**i

    def build_stage(self, stage: int, in_channels: int) -> nn.Sequential:
        """Stage ``stage`` (0 = res2) of this ResNet's kind; the C4 RoI head builds its res5 with it."""
        return make_stage(
            depth=self.depth,
            stage=stage,
            in_channels=in_channels,
            out_channels=self.res2_out_channels * 2**stage,
            bottleneck_channels=self.res2_bottleneck_channels * 2**stage,
            num_groups=self.num_groups,
            stride=1 if stage == 0 else 2,
            stride_in_1x1=self.stride_in_1x1,
            norm=self.norm,
        )

    def freeze(self, freeze_at: int) -> None:
        """detectron2's FREEZE_AT: 1 freezes the stem, 2 the stem and res2, and so on."""
        modules = [self.conv1, self.bn1] if freeze_at >= 1 else []
        for i in range(1, freeze_at):
            if hasattr(self, f"layer{i}"):
                modules.append(getattr(self, f"layer{i}"))
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for i, name in enumerate(STAGE_NAMES):
            layer = getattr(self, f"layer{i + 1}", None)
            if layer is None:
                break
            x = layer(x)
            if name in self.out_features:
                out[name] = x
        return out


class Backbone(nn.Module):
    """A ResNet body, optionally followed by an FPN; exposes output channels and strides by feature name."""

    def __init__(self, body: ResNet, fpn_channels: int = 0, fpn_in_features: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.body = body
        self.fpn: FeaturePyramidNetwork | None = None
        if fpn_channels:
            self.fpn_in_features = tuple(fpn_in_features)
            self.fpn = FeaturePyramidNetwork(
                [body.channels[f] for f in self.fpn_in_features], fpn_channels, extra_blocks=LastLevelMaxPool()
            )
            first = int(self.fpn_in_features[0][-1])
            names = [f"p{first + i}" for i in range(len(self.fpn_in_features) + 1)]
            self.out_channels = {n: fpn_channels for n in names}
            self.strides = {n: 2 ** int(n[1:]) for n in names}
        else:
            self.out_channels = {f: body.channels[f] for f in body.out_features}
            self.strides = {f: STAGE_STRIDES[f] for f in body.out_features}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.body(x)
        if self.fpn is None:
            return feats
        out = self.fpn(OrderedDict((f, feats[f]) for f in self.fpn_in_features))
        return dict(zip(self.out_channels, out.values()))


def init_weights(module: nn.Module) -> None:
    """Kaiming init for convs from scratch (detectron2's c2_msra_fill); unit/zero for norm layers."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def fold_norms(module: nn.Module) -> int:
    """Fold each frozen norm (FrozenBatchNorm2d, or BatchNorm2d in eval mode) into the conv before it, in place,
    for deployment: ResNet stems and blocks (``convN`` then ``bnN``) and downsample pairs (Sequential conv, norm).
    The same function up to float rounding, without the per-pixel multiply and add; returns how many were folded."""
    folded = 0
    for parent in list(module.modules()):
        pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        if isinstance(parent, nn.Sequential):
            pairs += [(str(i), str(i + 1)) for i in range(len(parent) - 1)]
        for conv_name, norm_name in pairs:
            conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
            if not isinstance(conv, nn.Conv2d) or not _frozen_norm(norm):
                continue
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                norm.eps, norm.weight, norm.bias)
            conv.weight, conv.bias = weight, bias
            setattr(parent, norm_name, nn.Identity())
            folded += 1
    return folded


def _frozen_norm(m: nn.Module | None) -> bool:
    return isinstance(m, FrozenBatchNorm2d) or (type(m) is nn.BatchNorm2d and not m.training
                                                 and m.track_running_stats)
