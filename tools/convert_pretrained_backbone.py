"""Convert detectron2's MSRA ImageNet ``R-50.pkl`` (caffe2 blobs) into a torchvision-named ``.pth``.

    python tools/convert_pretrained_backbone.py datasets/pretrained/R-50.pkl datasets/pretrained/R-50-msra.pth

Not needed for training (MODEL.BACKBONE.WEIGHTS reads the .pkl directly, numpy arrays only); useful to keep the
weights in a file that ``torch.load(weights_only=True)`` reads. The output records that the weights are MSRA's,
so loading it still checks MODEL.RESNETS.STRIDE_IN_1X1, INPUT.FORMAT, MODEL.PIXEL_MEAN and MODEL.PIXEL_STD.
"""

from __future__ import annotations

import argparse

from ovd.modeling.pretrained import CONVENTIONS, read_pretrained_resnet, save_pretrained_resnet


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="R-50.pkl (or any file MODEL.BACKBONE.WEIGHTS reads)")
    p.add_argument("output", help="the .pth to write")
    args = p.parse_args(argv)
    weights = read_pretrained_resnet(args.input)
    save_pretrained_resnet(weights, args.output)
    c = CONVENTIONS[weights.convention]
    print(f"wrote {len(weights.state)} tensors ({weights.convention} convention) to {args.output}; use it with "
          f"MODEL.RESNETS.STRIDE_IN_1X1 {str(c.stride_in_1x1).lower()} INPUT.FORMAT {c.input_format} "
          f"MODEL.PIXEL_MEAN {list(c.pixel_mean)} MODEL.PIXEL_STD {list(c.pixel_std)}")


if __name__ == "__main__":
    main()
