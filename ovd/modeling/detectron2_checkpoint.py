"""detectron2-format checkpoints of the original object-centric OVD code → `ovd` state dicts.

The released COCO (R50-C4) and LVIS (Mask R-CNN R50-FPN) checkpoints are dicts with a ``"model"`` entry of
detectron2 parameter names. Every name of those architectures has one rule below; a key no rule covers (another
architecture, e.g. CenterNet2) is reported rather than dropped.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import Tensor

_BLOCK_NORMS = [(r"\.conv(\d)\.norm\.", r".bn\1."), (r"\.shortcut\.norm\.", ".downsample.1."), (r"\.shortcut\.", ".downsample.0.")]


def _block(rest: str) -> str:
    for pat, rep in _BLOCK_NORMS:
        rest = re.sub(pat, rep, rest)
    return rest


def _rules(fpn_first_level: int) -> list[tuple[str, Callable[[re.Match], str]]]:
    return [
        (r"backbone\.(?:bottom_up\.)?stem\.conv1\.weight", lambda m: "backbone.body.conv1.weight"),
        (r"backbone\.(?:bottom_up\.)?stem\.conv1\.norm\.(\w+)", lambda m: f"backbone.body.bn1.{m[1]}"),
        (r"backbone\.(?:bottom_up\.)?res(\d)\.(\d+)(\..+)", lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}{_block(m[3])}"),
        (r"roi_heads\.res5\.(\d+)(\..+)", lambda m: f"roi_heads.box_head.res5.{m[1]}{_block(m[2])}"),
        (r"backbone\.fpn_lateral(\d)\.(weight|bias)", lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - fpn_first_level}.0.{m[2]}"),
        (r"backbone\.fpn_output(\d)\.(weight|bias)", lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - fpn_first_level}.0.{m[2]}"),
        (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", lambda m: f"rpn.head.conv.0.0.{m[1]}"),
        (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", lambda m: f"rpn.head.cls_logits.{m[1]}"),
        (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", lambda m: f"rpn.head.bbox_pred.{m[1]}"),
        (r"roi_heads\.box_head\.(fc\d\.(?:weight|bias))", lambda m: f"roi_heads.box_head.{m[1]}"),
        (r"roi_heads\.box_predictor\.cls_score\.((?:linear|fc\d)\.(?:weight|bias)|cls_bias)",
         lambda m: f"roi_heads.box_predictor.cls_score.{m[1]}"),
        (r"roi_heads\.box_predictor\.cls_score\.zs_weight", lambda m: "roi_heads.box_predictor.cls_score.text_embeds"),
        (r"roi_heads\.box_predictor\.(bbox_pred\.[02]\.(?:weight|bias)|freq_weight)", lambda m: f"roi_heads.box_predictor.{m[1]}"),
        (r"roi_heads\.mask_head\.((?:mask_fcn\d|deconv|predictor)\.(?:weight|bias))", lambda m: f"roi_heads.mask_head.{m[1]}"),
    ]


def is_detectron2_state(state: dict[str, Tensor]) -> bool:
    """True for detectron2 parameter names (``backbone.stem…``, ``backbone.bottom_up…``, ``proposal_generator…``)."""
    return any(k.startswith(("backbone.stem.", "backbone.bottom_up.", "proposal_generator.")) for k in state)


def convert_detectron2_state(state: dict[str, Tensor], *, source: str = "checkpoint") -> dict[str, Tensor]:
    """Rename a detectron2 state dict to `ovd` names; ``zs_weight`` (Tensor[D, C + 1], background column last)
    becomes ``text_embeds`` (Tensor[C, D]). Raises ValueError listing keys no rule covers."""
    levels = [int(m[1]) for k in state if (m := re.match(r"backbone\.fpn_lateral(\d)\.", k))]
    rules = [(re.compile(p), f) for p, f in _rules(min(levels) if levels else 2)]
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, rename in rules:
            m = pattern.fullmatch(key)
            if m:
                new = rename(m)
                if key.endswith("zs_weight"):
                    value = value[:, :-1].t().contiguous()
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{source} is a detectron2 checkpoint of an architecture ovd does not implement; "
            f"{len(unknown)} keys have no counterpart: {', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}"
        )
    return out
