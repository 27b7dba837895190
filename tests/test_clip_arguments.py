"""The teacher arguments shared by the tools that load CLIP: a random model only when asked for."""

import pytest

from tools_loader import load_tool

REQUIRED = {
    "dump_text_embeddings": ["--names", "a,b", "--out", "x.npy"],
    "extract_region_embeddings": ["--dataset", "d", "--proposals", "p.json", "--out", "s"],
    "mine_pseudo_labels": ["--image-labels", "l.json", "--out", "o.json", "--proposals", "p.json", "--image-root", "."],
}


@pytest.mark.parametrize("tool", sorted(REQUIRED))
def test_model_needs_weights_or_an_explicit_random_init(tool, capsys):
    parse = load_tool(tool).parse_args
    base = REQUIRED[tool] + ["--model", "ViT-B-32"]
    with pytest.raises(SystemExit):
        parse(base)
    assert "give --pretrained TAG|FILE, or --random-init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(REQUIRED[tool] + ["--model", "local-dir:teacher", "--pretrained", "openai"])
    assert "local-dir: model carries its own weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(base + ["--pretrained", "openai", "--random-init"])  # mutually exclusive
    args = parse(base + ["--random-init", "--seed", "3"])
    assert (args.model, args.pretrained, args.random_init, args.seed) == ("ViT-B-32", None, True, 3)
    assert parse(base + ["--pretrained", "w.pt"]).pretrained == "w.pt"
