"""The COCO / LVIS open-vocabulary splits, ImageNet-LVIS image labels, COCO caption labels and the catalogue names of
the real datasets, on tiny made-up files in the official formats (tests/official_formats.py)."""

import contextlib
import io
import json
import re

import pytest
from official_formats import (
    COCO_ID,
    LVIS_CATEGORIES,
    LVIS_RARE_IDS,
    LVIS_WNIDS,
    coco_captions,
    coco_instances,
    imagenet_tree,
    lvis_file,
    write,
)
from tools_loader import load_tool

from ovd.data.catalog import builtin_names, get_dataset
from ovd.data.datasets import load_coco_json, load_image_labels
from ovd.data.ov_splits import (
    COCO_BASE_NAMES,
    COCO_CATEGORIES,
    COCO_IGNORED_NAMES,
    COCO_NOVEL_NAMES,
    coco_split_ids,
    imagenet_lvis_image_labels,
    lvis_category_image_counts,
    make_coco_ov_splits,
    make_lvis_norare,
    read_synset_map,
)

NOVEL_IDS = [5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87]  # by hand from the COCO id list
COCO_TRAIN = {1: ["person", "dog", "hot dog"], 2: ["fire hydrant"], 3: ["cat"], 4: ["car", "person"],
              5: ["teddy bear", "bed"]}
COCO_VAL = {11: ["dog", "umbrella"], 12: ["traffic light"], 13: ["person", "sink", "wine glass"], 14: []}
CROWD = [401]  # image 4's person
CAPTIONS = {
    1: ["A man walks his dog past a hot dog stand.", "Person with a puppy."],
    3: ["A cat sleeping on a couch."],
    5: ["A teddy bear lying on a bed."],
    6: ["Hot dogs with mustard."],
    7: ["Two knives and a cup of coffee.", "A red fire hydrant."],
}
LVIS_TRAIN = {21: ("train2017", [3, 12, 9]), 22: ("train2017", [20]), 23: ("train2017", [12, 12, 1])}
LVIS_VAL = {31: ("val2017", [3, 27]), 32: ("train2017", [12])}
SYNSET_MAP = "\n".join([
    "# wnid synset (made up for the test; any order, comments allowed)",
    *(f"{wnid} {synset}" for synset, wnid in LVIS_WNIDS.items() if synset != "airplane.n.01"),
    "airplane.n.01 n02691156",
    "n01440764 tench.n.01  # a fish: no LVIS category",
]) + "\n"
IMAGENET = {"n02084071": [(30, 40), (25, 20)], "n02691156": [(16, 24)]}


def run_tool(name, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        load_tool(name).main([str(a) for a in argv])
    return out.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A datasets root with the official files (made up) and everything the tools make from them."""
    root = tmp_path_factory.mktemp("datasets")
    ann = root / "coco" / "annotations"
    write(ann / "instances_train2017.json", coco_instances(COCO_TRAIN, crowd=CROWD))
    write(ann / "instances_val2017.json", coco_instances(COCO_VAL, folder="val2017"))
    write(ann / "captions_train2017.json", coco_captions(CAPTIONS))
    write(root / "lvis" / "lvis_v1_train.json", lvis_file(LVIS_TRAIN))
    write(root / "lvis" / "lvis_v1_val.json", lvis_file(LVIS_VAL))
    imagenet_tree(root / "imagenet" / "ImageNet-LVIS", IMAGENET)
    (root / "imagenet" / "lvis_synsets.txt").write_text(SYNSET_MAP)
    printed = {
        "coco": run_tool("prepare_ovd_splits", ["coco", "--annotations", ann, "--out", root]),
        "lvis": run_tool("prepare_ovd_splits", ["lvis", "--train", root / "lvis/lvis_v1_train.json", "--out", root]),
        "captions": run_tool("captions_to_image_labels", [
            "--captions", ann / "captions_train2017.json", "--categories", root / "coco/zero-shot/ovd_split.json",
            "--unlabelled-categories", ann / "instances_val2017.json",
            "--out", root / "coco/zero-shot/captions_train2017_tags.json"]),
        "imagenet": run_tool("imagenet_lvis_image_labels", [
            "--lvis", root / "lvis/lvis_v1_val.json", "--synset-map", root / "imagenet/lvis_synsets.txt",
            "--image-root", root / "imagenet/ImageNet-LVIS",
            "--out", root / "imagenet/annotations/imagenet_lvis_image_info.json"]),
    }
    return root, printed


def read(path):
    return json.loads(path.read_text())


def get_dataset_at(root, name):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OVD_DATASETS", str(root))
        return get_dataset(name)


def test_coco_split_tables():
    names = [n for _, n in COCO_CATEGORIES]
    assert (len(COCO_BASE_NAMES), len(COCO_NOVEL_NAMES), len(COCO_IGNORED_NAMES)) == (48, 17, 15)
    assert 48 + 17 + 15 == len(set(COCO_BASE_NAMES) | set(COCO_NOVEL_NAMES) | set(COCO_IGNORED_NAMES)) == 80
    assert sorted(COCO_BASE_NAMES + COCO_NOVEL_NAMES + COCO_IGNORED_NAMES) == sorted(names)
    # the real COCO ids: 1..90 without the 10 ids COCO never used
    assert [i for i in range(1, 91) if i not in dict(COCO_CATEGORIES)] == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert (COCO_ID["person"], COCO_ID["dog"], COCO_ID["tv"], COCO_ID["toothbrush"]) == (1, 18, 72, 90)
    ids = coco_split_ids()
    assert ids["novel"] == NOVEL_IDS
    assert len(ids["base"]) == 48 and ids["base"][:5] == [1, 2, 3, 4, 7] and 58 in ids["ignored"]


def test_coco_split_contents(root):
    root, printed = root
    zs = root / "coco" / "zero-shot"
    train = read(zs / "instances_train2017_seen_2_oriorder.json")
    val = read(zs / "instances_val2017_all_2_oriorder.json")
    meta = read(zs / "ovd_split.json")
    ids = coco_split_ids()
    for data in (train, val, meta):
        assert [c["id"] for c in data["categories"]] == sorted(ids["base"] + ids["novel"])  # 65, COCO id order
        assert {c["name"] for c in data["categories"]}.isdisjoint(COCO_IGNORED_NAMES)
        assert [c["name"] for c in data["categories"] if c["split"] == "novel"] == [
            n for _, n in COCO_CATEGORIES if n in COCO_NOVEL_NAMES]
        assert all(c["supercategory"] for c in data["categories"])  # the file's own fields are kept
    # train: base boxes only (crowd ones too), images that have one; novel and ignored boxes are gone
    assert [a["id"] for a in train["annotations"]] == [100, 400, 401, 501]
    assert [img["id"] for img in train["images"]] == [1, 4, 5]
    assert train["images"][0]["coco_url"].endswith("train2017/000000000001.jpg") and "info" in train
    # val (generalized): the boxes of all 65 classes, not the 15 ignored ones
    assert [a["id"] for a in val["annotations"]] == [1100, 1101, 1300, 1301]
    assert [img["id"] for img in val["images"]] == [11, 13]
    assert meta["novel_category_ids"] == NOVEL_IDS and meta["novel_names"][:3] == ["airplane", "bus", "cat"]
    assert len(meta["base_names"]) == 48 and meta["ignored_names"][0] == "traffic light"
    assert meta["counts"] == {"train": {"images": 3, "annotations": 4, "categories": 65},
                              "val": {"images": 2, "annotations": 4, "categories": 65}}
    rows = printed["coco"]
    assert "48 base, 17 novel, 15 ignored" in rows
    assert re.search(r"instances_train2017\.json\s+5\s+9\s+80", rows)
    assert re.search(r"instances_train2017_seen_2_oriorder\.json\s+3\s+4\s+65", rows)
    assert re.search(r"instances_val2017_all_2_oriorder\.json\s+2\s+4\s+65", rows)


def test_prepare_is_deterministic(root, tmp_path):
    root, _ = root
    run_tool("prepare_ovd_splits", ["coco", "--annotations", root / "coco/annotations", "--out", tmp_path])
    run_tool("prepare_ovd_splits", ["lvis", "--train", root / "lvis/lvis_v1_train.json", "--out", tmp_path])
    for rel in ("coco/zero-shot/instances_train2017_seen_2_oriorder.json", "coco/zero-shot/ovd_split.json",
                "lvis/lvis_v1_train_norare.json", "metadata/lvis_v1_train_cat_info.json"):
        assert (tmp_path / rel).read_bytes() == (root / rel).read_bytes()


def test_lvis_norare_and_category_image_counts(root):
    root, printed = root
    norare = read(root / "lvis" / "lvis_v1_train_norare.json")
    assert [a["id"] for a in norare["annotations"]] == [2100, 2101, 2300, 2301, 2302]  # 2102 (bow) and 2200 gone
    assert [img["id"] for img in norare["images"]] == [21, 22, 23]  # every image kept
    assert norare["categories"] == lvis_file(LVIS_TRAIN)["categories"]  # all categories, as in the file
    assert "coco_url" in norare["images"][0] and "file_name" not in norare["images"][0]
    info = read(root / "metadata" / "lvis_v1_train_cat_info.json")
    counts = {c["id"]: (c["image_count"], c["instance_count"]) for c in info}
    assert counts == {1: (1, 1), 3: (1, 1), 9: (0, 0), 12: (2, 3), 20: (0, 0), 27: (0, 0)}
    meta = read(root / "lvis" / "lvis_v1_ovd_split.json")
    assert meta["novel_category_ids"] == LVIS_RARE_IDS and meta["base_category_ids"] == [1, 3, 12]
    assert meta["counts"]["train_norare"] == {"images": 3, "annotations": 5, "categories": 6}
    assert "3 base (2 frequent, 1 common), 3 novel (rare)" in printed["lvis"]
    assert re.search(r"lvis_v1_train_norare\.json\s+3\s+5\s+6", printed["lvis"])

    from ovd.modeling.build import read_class_frequencies  # the reader of MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH

    freq = read_class_frequencies(str(root / "metadata" / "lvis_v1_train_cat_info.json"), 6)
    assert freq.tolist() == pytest.approx([1.0, 1.0, 0.0, 2**0.5, 0.0, 0.0])


def test_lvis_image_counts_of_the_full_file():
    counts = {c["id"]: c["image_count"] for c in lvis_category_image_counts(lvis_file(LVIS_TRAIN))}
    assert counts[9] == 1 and counts[20] == 1  # rare classes have images before the split
    assert make_lvis_norare(lvis_file({1: ("train2017", [9])}))["annotations"] == []


def test_caption_labels_on_the_official_format(root):
    root, printed = root
    tags = read(root / "coco" / "zero-shot" / "captions_train2017_tags.json")
    labels = {img["id"]: img["pos_category_ids"] for img in tags["images"]}
    # novel classes are labels (dog, cat, couch, cup, knife); "hot dog" and "teddy bear" (ignored classes) label
    # neither dog nor bear; image 6 names nothing of the 65 and is dropped
    assert labels == {1: [1, 18], 3: [17, 63], 5: [65], 7: [47, 49]}
    assert [c["id"] for c in tags["categories"]] == sorted(coco_split_ids()["base"] + NOVEL_IDS)
    image = tags["images"][0]
    assert image["file_name"] == "000000000001.jpg" and image["captions"][1] == "Person with a puppy."
    assert "5 images, 7 captions, 65 categories" in printed["captions"]

    ann = root / "coco" / "annotations"
    without = run_tool("captions_to_image_labels", ["--captions", ann / "captions_train2017.json", "--categories",
                                                    root / "coco/zero-shot/ovd_split.json", "--out", root / "x.json"])
    labels = {img["id"]: img["pos_category_ids"] for img in read(root / "x.json")["images"]}
    assert labels[6] == [COCO_ID["dog"]] and labels[5] == [COCO_ID["bear"], COCO_ID["bed"]]  # what the option avoids
    assert "5 images" in without


def test_missing_captions_file(root):
    root, _ = root
    missing = root / "coco" / "annotations" / "captions_val2017.json"
    with pytest.raises(FileNotFoundError, match=f"caption file not found: {re.escape(str(missing))}"):
        run_tool("captions_to_image_labels", ["--captions", missing, "--categories",
                                              root / "coco/zero-shot/ovd_split.json", "--out", root / "x.json"])


def test_imagenet_lvis_image_labels(root):
    root, printed = root
    data = read(root / "imagenet" / "annotations" / "imagenet_lvis_image_info.json")
    # folders, then files, in sorted order; ids from 1
    assert [(i["id"], i["file_name"], i["height"], i["width"], i["pos_category_ids"]) for i in data["images"]] == [
        (1, "n02084071/n02084071_1.JPEG", 30, 40, [12]),
        (2, "n02084071/n02084071_2.JPEG", 25, 20, [12]),
        (3, "n02691156/n02691156_1.JPEG", 16, 24, [3]),
    ]
    assert data["annotations"] == []
    cats = {c["id"]: c for c in data["categories"]}
    assert list(cats) == [c["id"] for c in LVIS_CATEGORIES]
    assert (cats[12]["image_count"], cats[3]["image_count"], cats[9]["image_count"]) == (2, 1, 0)
    assert cats[9]["split"] == "novel" and cats[12]["split"] == "base" and cats[12]["synset"] == "dog.n.01"
    assert "3 images of 2 of 2 folders" in printed["imagenet"]
    dataset = load_image_labels(get_dataset_at(root, "imagenet_lvis_v1"))
    assert dataset.records[2].file_name == root / "imagenet" / "ImageNet-LVIS" / "n02691156" / "n02691156_1.JPEG"

    listed = run_tool("imagenet_lvis_image_labels", ["--lvis", root / "lvis/lvis_v1_val.json", "--synset-map",
                                                     root / "imagenet/lvis_synsets.txt", "--list-wnids"])
    assert listed.splitlines()[:2] == ["n02681392 aerosol.n.02 aerosol_can", "n02691156 airplane.n.01 airplane"]
    assert len(listed.splitlines()) == len(LVIS_CATEGORIES)


def test_imagenet_header_reading_in_workers_gives_the_same_file(root):
    root, _ = root
    args = (root / "imagenet" / "ImageNet-LVIS", LVIS_CATEGORIES, {w: s for s, w in LVIS_WNIDS.items()})
    assert imagenet_lvis_image_labels(*args, num_workers=2) == imagenet_lvis_image_labels(*args)


def test_imagenet_folder_without_lvis_category(tmp_path, root):
    root, _ = root
    images = imagenet_tree(tmp_path / "in21k", {**IMAGENET, "n01440764": [(8, 8)], "n09999999": [(8, 8)]})
    argv = ["--lvis", root / "lvis/lvis_v1_val.json", "--synset-map", root / "imagenet/lvis_synsets.txt",
            "--image-root", images, "--out", tmp_path / "out.json"]
    with pytest.raises(ValueError) as e:
        run_tool("imagenet_lvis_image_labels", argv)
    message = str(e.value)
    assert f"{images / 'n01440764'}: synset 'tench.n.01' is no LVIS category's synset" in message
    assert f"{images / 'n09999999'}: not in the synset map" in message
    assert "2 of 4 ImageNet folders map to no LVIS category" in message and "--skip-unmatched" in message
    assert not (tmp_path / "out.json").exists()

    printed = run_tool("imagenet_lvis_image_labels", argv + ["--skip-unmatched"])
    assert "3 images of 2 of 4 folders" in printed and "left out 2 folders" in printed
    assert "n09999999: not in the synset map" in printed
    assert len(read(tmp_path / "out.json")["images"]) == 3


def test_synset_map_formats(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"n02084071": "dog.n.01", "bow.n.04": "n02879718"}))
    assert read_synset_map(tmp_path / "map.json") == {"n02084071": "dog.n.01", "n02879718": "bow.n.04"}
    bad = tmp_path / "bad.txt"
    bad.write_text("n02084071 dog.n.01\n\nn0208 dog\n")
    with pytest.raises(ValueError, match=f"synset map {re.escape(str(bad))}, line 3: expected a WordNet id and a "
                                         r"synset name such as 'n02084071 dog\.n\.01', got 'n0208' 'dog'"):
        read_synset_map(bad)
    bad.write_text("n02084071 dog.n.01\nn02084071 cat.n.01\n")
    with pytest.raises(ValueError, match=r"line 2: n02084071 is mapped to both 'dog\.n\.01' and 'cat\.n\.01'"):
        read_synset_map(bad)
    with pytest.raises(FileNotFoundError, match=f"synset map not found: {re.escape(str(tmp_path / 'none.txt'))}"):
        read_synset_map(tmp_path / "none.txt")


def test_catalog_names_resolve(root, monkeypatch):
    root, _ = root
    monkeypatch.setenv("OVD_DATASETS", str(root))
    names = ["coco_zeroshot_train_oriorder", "coco_generalized_zeroshot_val", "coco_caption_train_tags",
             "lvis_v1_train_norare", "lvis_v1_val", "imagenet_lvis_v1"]
    assert set(names) <= set(builtin_names())
    specs = {n: get_dataset(n) for n in names}
    val_spec = specs["coco_generalized_zeroshot_val"]
    assert val_spec.json_file == root / "coco/zero-shot/instances_val2017_all_2_oriorder.json"
    assert val_spec.image_root == root / "coco/val2017"
    assert specs["coco_zeroshot_train_oriorder"].image_root == root / "coco/train2017"
    for n in names[:3]:
        assert specs[n].novel_category_ids == tuple(NOVEL_IDS)
    assert specs["lvis_v1_val"].novel_category_ids == tuple(LVIS_RARE_IDS)  # read from the file's frequency
    assert specs["lvis_v1_train_norare"].novel_category_ids == tuple(LVIS_RARE_IDS)  # from the split metadata
    assert specs["imagenet_lvis_v1"].image_root == root / "imagenet/ImageNet-LVIS"

    val = load_coco_json(specs["coco_generalized_zeroshot_val"])
    assert len(val.class_names) == 65 and val.novel_category_ids == tuple(NOVEL_IDS)
    assert val.records[0].file_name == root / "coco" / "val2017" / "000000000011.jpg"
    # LVIS images have no file_name: their coco_url names the COCO folder, train2017/ or val2017/
    lvis_val = load_coco_json(specs["lvis_v1_val"], with_masks=True)
    assert [r.file_name for r in lvis_val.records] == [root / "coco/val2017/000000000031.jpg",
                                                       root / "coco/train2017/000000000032.jpg"]
    assert lvis_val.novel_category_ids == tuple(LVIS_RARE_IDS) and len(lvis_val.records[0].masks) == 2
    norare = load_coco_json(specs["lvis_v1_train_norare"])
    assert [len(r.boxes) for r in norare.records] == [2, 0, 3]
    tags = load_image_labels(specs["coco_caption_train_tags"])
    assert [r.image_labels.tolist() for r in tags.records] == [[1, 18], [17, 63], [65], [47, 49]]
    assert tags.category_ids == val.category_ids  # one vocabulary for the box and the image-labelled source


@pytest.mark.parametrize("name, missing, command", [
    ("coco_zeroshot_train_oriorder", "coco/zero-shot/instances_train2017_seen_2_oriorder.json",
     "python tools/prepare_ovd_splits.py coco --annotations <root>/coco/annotations --out <root>`"),
    ("coco_generalized_zeroshot_val", "coco/zero-shot/instances_val2017_all_2_oriorder.json",
     "python tools/prepare_ovd_splits.py coco"),
    ("coco_caption_train_tags", "coco/zero-shot/captions_train2017_tags.json",
     "python tools/captions_to_image_labels.py --captions <root>/coco/annotations/captions_train2017.json"),
    ("lvis_v1_train_norare", "lvis/lvis_v1_train_norare.json",
     "python tools/prepare_ovd_splits.py lvis --train <root>/lvis/lvis_v1_train.json --out <root>`"),
    ("lvis_v1_val", "lvis/lvis_v1_val.json", "unzip lvis_v1_val.json.zip"),
    ("imagenet_lvis_v1", "imagenet/annotations/imagenet_lvis_image_info.json",
     "python tools/imagenet_lvis_image_labels.py --lvis <root>/lvis/lvis_v1_val.json"),
])
def test_catalog_missing_file_names_the_command(name, missing, command, tmp_path, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        get_dataset(name)
    message = str(e.value).replace(str(tmp_path), "<root>")
    assert message.startswith(f"dataset {name}: <root>/{missing} not found; ")
    assert command in message and message.endswith("or set OVD_DATASETS")


def test_split_rejects_a_renamed_category(root, tmp_path):
    root, _ = root
    train = coco_instances(COCO_TRAIN)
    next(c for c in train["categories"] if c["name"] == "dog")["name"] = "doggy"
    ann = tmp_path / "annotations"
    write(ann / "instances_train2017.json", train)
    write(ann / "instances_val2017.json", coco_instances(COCO_VAL, folder="val2017"))
    with pytest.raises(ValueError) as e:
        run_tool("prepare_ovd_splits", ["coco", "--annotations", ann, "--out", tmp_path])
    assert str(e.value).startswith(f"{ann / 'instances_train2017.json'}: its categories are not the 80 COCO 2017 "
                                   "categories that the open-vocabulary split names (ovd/data/ov_splits.py): "
                                   "id 18 is named 'doggy', expected 'dog'")
    assert not (tmp_path / "coco").exists()


@pytest.mark.parametrize("data, message", [
    ([{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}],
     "<file> is not a COCO instances file: expected a JSON object with 'images', 'annotations' and 'categories' "
     "lists, found a JSON list"),
    (coco_captions(CAPTIONS), "<file> is not a COCO instances file: it has no 'categories' list"),
    (lvis_file(LVIS_VAL), "<file>: its categories are not the 80 COCO 2017 categories that the open-vocabulary split "
                          "names (ovd/data/ov_splits.py): id 1 is named 'aerosol_can', expected 'person'; id 2 "
                          "('bicycle') is missing"),
])
def test_coco_split_rejects_files_of_other_formats(data, message, tmp_path):
    write(tmp_path / "instances_train2017.json", data)
    write(tmp_path / "instances_val2017.json", coco_instances(COCO_VAL, folder="val2017"))
    with pytest.raises(ValueError) as e:
        run_tool("prepare_ovd_splits", ["coco", "--annotations", tmp_path, "--out", tmp_path])
    assert str(e.value).startswith(message.replace("<file>", str(tmp_path / "instances_train2017.json")))


def test_lvis_split_rejects_a_coco_file(tmp_path):
    path = write(tmp_path / "lvis_v1_train.json", coco_instances(COCO_TRAIN))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is not an LVIS v1 file: category 1 \\('person'\\) "
                                         "has no 'frequency', expected 'r', 'c' or 'f'$"):
        run_tool("prepare_ovd_splits", ["lvis", "--train", path, "--out", tmp_path])
    with pytest.raises(FileNotFoundError, match="LVIS v1 train file .* not found: .*/none.json"):
        run_tool("prepare_ovd_splits", ["lvis", "--train", tmp_path / "none.json", "--out", tmp_path])


def test_split_rejects_annotations_of_unknown_categories():
    train = coco_instances(COCO_TRAIN)
    train["annotations"][0]["category_id"] = 12  # an id COCO never used
    with pytest.raises(ValueError, match=r"^train\.json: annotation .* has category_id 12, which is not in its "
                                         r"'categories'$"):
        make_coco_ov_splits(train, coco_instances(COCO_VAL), train_source="train.json")
