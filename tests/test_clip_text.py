"""ovd.clip: loading/saving open_clip models and text embeddings of a vocabulary, on the random-init toy CLIP."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovd.clip import (
    DEFAULT_TEMPLATES,
    encode_text,
    load_clip,
    load_templates,
    load_text_embeddings,
    save_clip,
    save_text_embeddings,
)

TOY = "ovd-toy-vit"
NAMES = ["red circle", "blue star", "green square", "yellow triangle", "white cross"]
TEMPLATES = ("a photo of a {}", "a drawing of the {}", "{}")
TOOL = Path(__file__).resolve().parents[1] / "tools" / "dump_text_embeddings.py"

_unpickled = []


def _mark_unpickled():
    _unpickled.append(True)
    return "boom"


class _Boom:
    """Unpickling it calls _mark_unpickled: proof that a loader ran pickle code."""

    def __reduce__(self):
        return (_mark_unpickled, ())


@pytest.fixture(scope="module")
def toy():
    return load_clip(TOY, seed=0)


def test_load_clip_random_init_is_seeded_and_leaves_global_rng_alone(toy):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_clip(TOY, seed=0)
    assert torch.equal(torch.rand(3), expected)

    assert toy.embed_dim == 128 and toy.context_length == 16 and not toy.model.training
    assert torch.equal(encode_text(toy, NAMES), encode_text(again, NAMES))
    assert not torch.allclose(encode_text(toy, NAMES), encode_text(load_clip(TOY, seed=1), NAMES))
    image = toy.preprocess(Image.new("RGB", (90, 70)))
    assert image.shape == (3, 64, 64)


def test_encode_text_shape_norm_and_prompt(toy):
    embeds = encode_text(toy, NAMES)
    assert embeds.shape == (len(NAMES), 128) and embeds.dtype == torch.float32
    torch.testing.assert_close(embeds.norm(dim=1), torch.ones(len(NAMES)))
    with torch.no_grad():
        direct = F.normalize(toy.model.encode_text(toy.tokenizer([f"a photo of a {n}" for n in NAMES])), dim=-1)
    torch.testing.assert_close(embeds, direct)
    assert DEFAULT_TEMPLATES == ("a photo of a {}",)
    # LVIS names: underscores read as spaces in the prompt
    lvis = encode_text(toy, ["aerosol_can", "bow_(weapon)"])
    torch.testing.assert_close(lvis, encode_text(toy, ["aerosol can", "bow (weapon)"]))


def test_encode_text_ensemble_is_normalised_mean_of_normalised_prompts(toy):
    singles = torch.stack([encode_text(toy, NAMES, templates=(t,)) for t in TEMPLATES])
    expected = F.normalize(singles.mean(dim=0), dim=-1)
    torch.testing.assert_close(encode_text(toy, NAMES, templates=TEMPLATES), expected)


def test_encode_text_does_not_depend_on_batch_size(toy):
    small = encode_text(toy, NAMES, templates=TEMPLATES, batch_size=2)
    large = encode_text(toy, NAMES, templates=TEMPLATES, batch_size=256)
    torch.testing.assert_close(small, large, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "names, templates, match",
    [
        ([], DEFAULT_TEMPLATES, "the vocabulary is empty"),
        (["red circle", "blue star", "red circle"], DEFAULT_TEMPLATES, r"duplicate.*'red circle'"),
        (["red circle", "  "], DEFAULT_TEMPLATES, "blank"),
        (["red circle", "one two three four five six seven eight nine ten eleven"], DEFAULT_TEMPLATES,
         r"exceed the text tower's 16 tokens.*'one two three four five six seven eight nine ten eleven'"),
        (["red circle"], ("a photo of a thing",), r"exactly one '\{\}'.*a photo of a thing"),
        (["red circle"], (), "at least one template"),
    ],
)
def test_encode_text_errors(toy, names, templates, match):
    with pytest.raises(ValueError, match=match):
        encode_text(toy, names, templates=templates)


def test_prompt_of_exactly_context_length_tokens_is_accepted(toy):
    # "a photo of a" + ten words + start/end tokens = 16 tokens, the toy tower's context; one word more is refused above.
    assert encode_text(toy, ["one two three four five six seven eight nine ten"]).shape == (1, 128)


def test_load_templates(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a photo of a {}\n\nthe {} in a picture\n")
    assert load_templates(good) == ("a photo of a {}", "the {} in a picture")
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}\na photo\n")
    with pytest.raises(ValueError, match="a photo'"):
        load_templates(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_templates(tmp_path / "missing.txt")


def test_text_embeddings_round_trip_with_sidecar(toy, tmp_path):
    embeds = encode_text(toy, NAMES, templates=TEMPLATES)
    path = save_text_embeddings(tmp_path / "vocab.npy", embeds, names=NAMES, templates=TEMPLATES, model_name=TOY, pretrained=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json", "vocab.npy"]
    meta = json.loads((tmp_path / "vocab.json").read_text())
    assert meta == {"names": NAMES, "templates": list(TEMPLATES), "model": TOY, "pretrained": None, "dim": 128, "normalized": True}

    loaded = load_text_embeddings(path, expected_names=NAMES)
    assert loaded.embeds.dtype == np.float32 and np.array_equal(loaded.embeds, embeds.numpy())
    assert loaded.names == NAMES and loaded.meta == meta

    other = NAMES[:2] + ["purple ring"] + NAMES[3:]
    with pytest.raises(ValueError, match=r"vocab.npy.*name 2 is 'green square'.*'purple ring' expected"):
        load_text_embeddings(path, expected_names=other)


def test_load_plain_float16_npy_without_sidecar(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(4, 8)).astype(np.float16)
    np.save(tmp_path / "detic.npy", raw)
    loaded = load_text_embeddings(tmp_path / "detic.npy", expected_names=["a", "b", "c", "d"])
    assert loaded.names is None and loaded.meta == {}
    assert loaded.embeds.dtype == np.float32 and loaded.embeds.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(loaded.embeds, axis=1), 1.0, rtol=1e-6)
    expected = raw.astype(np.float32) / np.linalg.norm(raw.astype(np.float32), axis=1, keepdims=True)
    np.testing.assert_allclose(loaded.embeds, expected, rtol=1e-6)


def test_load_text_embeddings_errors(tmp_path):
    path = tmp_path / "vocab.npy"
    np.save(path, np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match=r"vocab.npy has 3 rows but 5 class names") as e:
        load_text_embeddings(path, expected_names=list("abcde"))
    assert "transposed" not in str(e.value)
    with pytest.raises(ValueError, match=r"has 3 rows but 8 class names.*looks transposed"):
        load_text_embeddings(path, expected_names=list("abcdefgh"))

    np.save(tmp_path / "flat.npy", np.ones(8, np.float32))
    with pytest.raises(ValueError, match=r"flat.npy must hold a 2-D"):
        load_text_embeddings(tmp_path / "flat.npy")
    np.save(tmp_path / "nan.npy", np.full((2, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"nan.npy contains non-finite"):
        load_text_embeddings(tmp_path / "nan.npy")
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        load_text_embeddings(tmp_path / "absent.npy")


def test_load_text_embeddings_refuses_pickles(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([_Boom()], dtype=object), allow_pickle=True)
    _unpickled.clear()
    with pytest.raises(ValueError, match=r"evil.npy is not a plain numeric array"):
        load_text_embeddings(path)
    assert not _unpickled


def test_save_clip_reloads_bit_exactly(toy, tmp_path):
    folder = save_clip(toy, tmp_path / "toy_clip")
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_pytorch_model.bin"]
    expected = encode_text(toy, NAMES)

    from_dir = load_clip(f"local-dir:{folder}")
    assert from_dir.embed_dim == 128 and from_dir.context_length == 16 and from_dir.pretrained is None
    assert torch.equal(encode_text(from_dir, NAMES), expected)
    from_file = load_clip(TOY, pretrained=str(folder / "open_clip_pytorch_model.bin"))
    assert torch.equal(encode_text(from_file, NAMES), expected)
    for key, value in toy.model.state_dict().items():
        assert torch.equal(from_dir.model.state_dict()[key], value), key

    # A bare model saves too, given its architecture; the reloaded copy saves again identically.
    save_clip(from_dir.model, tmp_path / "again", model_name=TOY)
    assert torch.equal(encode_text(load_clip(f"local-dir:{tmp_path / 'again'}"), NAMES), expected)


def test_load_clip_checkpoint_is_loaded_without_running_pickle_code(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"logit_scale": torch.zeros(()), "payload": _Boom()}, path)
    _unpickled.clear()
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_clip(TOY, pretrained=str(path))
    assert not _unpickled


def test_load_clip_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ovd-toy-vt'.*ovd-toy-vit"):
        load_clip("ovd-toy-vt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_clip(TOY, pretrained=str(tmp_path / "nowhere.pt"))
    with pytest.raises(ValueError, match="known tag"):
        load_clip(TOY, pretrained="no-such-tag")
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_clip(f"local-dir:{tmp_path / 'no_such_folder'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_clip(f"local-dir:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="weights are in its folder"):
        load_clip(f"local-dir:{tmp_path / 'empty'}", pretrained="any-tag")


def test_dump_text_embeddings_cli(tmp_path, capsys):
    main = runpy.run_path(str(TOOL))["main"]
    coco = {"categories": [{"id": 7, "name": "blue star"}, {"id": 2, "name": "red circle"}, {"id": 5, "name": "green ring"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    (tmp_path / "templates.txt").write_text("a photo of a {}\na drawing of a {}\n")
    out = tmp_path / "out" / "vocab.npy"
    main(["--model", TOY, "--random-init", "--seed", "0", "--coco-json", str(tmp_path / "instances.json"),
          "--templates-file", str(tmp_path / "templates.txt"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "3x128" in printed and str(out) in printed

    loaded = load_text_embeddings(out, expected_names=["red circle", "green ring", "blue star"])
    assert loaded.meta["templates"] == ["a photo of a {}", "a drawing of a {}"] and loaded.meta["model"] == TOY
    expected = encode_text(load_clip(TOY, seed=0), loaded.names, templates=loaded.meta["templates"])
    assert np.array_equal(loaded.embeds, expected.numpy())

    main(["--model", TOY, "--random-init", "--names", "red circle, blue star", "--out", str(tmp_path / "two.npy")])
    assert load_text_embeddings(tmp_path / "two.npy").names == ["red circle", "blue star"]
    with pytest.raises(SystemExit):
        main(["--model", TOY, "--names", "a,b", "--out", str(tmp_path / "x.npy")])
