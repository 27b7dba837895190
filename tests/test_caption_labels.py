"""Image-level labels from captions: word matching, plurals, synonyms, precedence, files, the shapes world."""

import json

import pytest
from tools_loader import load_tool

from ovd.pseudo_labels.captions import (
    CaptionMatcher,
    captions_to_image_labels,
    compare_image_labels,
    load_caption_images,
    load_categories,
    plural_forms,
)

NAMES = ["dog", "hot dog", "cat", "car", "knife", "bus", "box", "puppy", "teddy bear", "bear", "person", "sheep",
         "red circle", "circle", "tie", "wine glass", "mouse"]
CATEGORIES = [{"id": i, "name": n} for i, n in enumerate(NAMES, start=1)]
ID = {n: i for i, n in enumerate(NAMES, start=1)}


@pytest.fixture(scope="module")
def matcher():
    return CaptionMatcher(CATEGORIES, synonyms={"puppy": ["pup"], "car": ["automobile"]})


def names(matcher, text):
    return [NAMES[i - 1] for i in matcher.match(text)]


@pytest.mark.parametrize("word, plurals", [
    ("dog", {"dogs"}), ("bus", {"buses"}), ("box", {"boxes"}), ("puppy", {"puppies"}), ("toy", {"toys"}),
    ("knife", {"knives"}), ("person", {"people", "persons"}), ("sheep", set()),
    ("policeman", {"policemen", "policemans"}),
    ("potato", {"potatos", "potatoes"}), ("bench", {"benches"}),
])
def test_plural_forms(word, plurals):
    assert plural_forms(word) == plurals


@pytest.mark.parametrize("text, expected", [
    ("two dogs", ["dog"]),
    ("three knives on a table", ["knife"]),
    ("buses and boxes", ["bus", "box"]),
    ("puppies playing", ["puppy"]),
    ("a flock of sheep", ["sheep"]),
    ("people and mice", ["person", "mouse"]),
    # words inside other words never match
    ("a category of concatenated scars", []),
    ("a dogma about boxers", []),
    ("ties, a tie-breaker", ["tie"]),  # "tie-breaker" is two words, "tie" and "breaker"
    # case and punctuation
    ("A DOG.", ["dog"]),
    ("dog, cat; car!", ["dog", "cat", "car"]),
    ("the dog's bowl", ["dog"]),
    # multi-word names, longest match wins over the words inside it
    ("a hot dog", ["hot dog"]),
    ("hot dogs and a dog", ["dog", "hot dog"]),
    ("a hot-dog stand", ["hot dog"]),
    ("a hotdog", ["hot dog"]),  # a multi-word name written as one word matches (documented choice)
    ("a teddy bear and a brown bear", ["teddy bear", "bear"]),
    ("two teddy bears", ["teddy bear"]),
    ("a red circle", ["red circle"]),
    ("a circle and two red circles", ["red circle", "circle"]),
    ("wine glasses", ["wine glass"]),
    # synonyms and their plurals
    ("a pup", ["puppy"]),
    ("two automobiles", ["car"]),
])
def test_match(matcher, text, expected):
    assert names(matcher, text) == sorted(expected, key=lambda n: ID[n])


def test_overlapping_spans_longest_wins():
    m = CaptionMatcher([{"id": 1, "name": "hot dog"}, {"id": 2, "name": "dog bed"}, {"id": 3, "name": "dog"}])
    # "hot dog" and "dog bed" overlap on "dog": equally long, the leftmost is kept and "dog bed" is not named.
    assert m.spans("a hot dog bed") == [(1, 3, (1,))]
    m = CaptionMatcher([{"id": 1, "name": "dog"}, {"id": 2, "name": "big dog bed"}])
    assert m.match("a big dog bed") == [2]


def test_category_synonyms_field_and_qualifiers():
    # LVIS style: underscores, a parenthesised qualifier, and a synonyms field.
    m = CaptionMatcher([
        {"id": 1, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)", "longbow"]},
        {"id": 2, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"]},
        {"id": 3, "name": "bow_(decorative_ribbons)", "synonyms": ["bow_(decorative_ribbons)"]},
    ])
    assert m.match("a longbow") == [1]
    assert m.match("two spray cans and an aerosol can") == [2]
    # "bow" is the name of two categories: both are named, and the form is reported as ambiguous.
    assert m.match("a bow") == [1, 3]
    assert m.ambiguous_forms == ["bow", "bows"]


def test_name_beats_synonym_of_another_category():
    m = CaptionMatcher([{"id": 1, "name": "mouse"}, {"id": 2, "name": "computer mouse", "synonyms": ["mouse"]}])
    assert m.match("a mouse") == [1]
    assert m.match("a computer mouse") == [2]


def test_bad_categories():
    with pytest.raises(ValueError, match="twice"):
        CaptionMatcher([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(ValueError, match="not categories"):
        CaptionMatcher([{"id": 1, "name": "dog"}], synonyms={"cat": ["kitty"]})


def test_coco_caption_file(tmp_path):
    captions = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 10, "width": 10},
                   {"id": 8, "file_name": "b.jpg", "height": 10, "width": 10},
                   {"id": 9, "file_name": "c.jpg", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 7, "caption": "Two dogs on a bus."},
                        {"id": 2, "image_id": 7, "caption": "A cat watches."},
                        {"id": 3, "image_id": 8, "caption": "An empty street."},
                        {"id": 4, "image_id": 9, "caption": "A hot dog."}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps({"categories": CATEGORIES[::-1]}))
    images = load_caption_images(tmp_path / "captions.json")
    assert images[0]["captions"] == ["Two dogs on a bus.", "A cat watches."]
    categories = load_categories(tmp_path / "instances.json")
    assert [c["id"] for c in categories] == sorted(ID.values())

    dataset, stats = captions_to_image_labels(images, categories)
    assert [(img["id"], img["pos_category_ids"]) for img in dataset["images"]] == [
        (7, [ID["dog"], ID["cat"], ID["bus"]]), (9, [ID["hot dog"]])]
    assert dataset["annotations"] == [] and dataset["categories"] == categories
    assert dataset["images"][0]["file_name"] == "a.jpg"
    assert (stats.images, stats.captions, stats.labelled_images) == (3, 4, 2)
    assert (stats.empty_images, stats.dropped_images) == (1, 1)
    assert stats.labels == 4 and stats.labels_per_image == 2.0
    assert stats.images_per_class["dog"] == 1 and stats.images_per_class["car"] == 0

    kept, stats = captions_to_image_labels(images, categories, keep_empty=True)
    assert [img["pos_category_ids"] for img in kept["images"]][1] == [] and stats.dropped_images == 0


def test_bad_caption_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_caption_images(tmp_path / "missing.json")
    (tmp_path / "no_images.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="no_images.json.*no 'images'"):
        load_caption_images(tmp_path / "no_images.json")
    (tmp_path / "no_captions.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match="no_captions.json holds no captions"):
        load_caption_images(tmp_path / "no_captions.json")
    (tmp_path / "orphan.json").write_text(json.dumps({"images": [{"id": 1}],
                                                      "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(ValueError, match="orphan.json.*not in 'images'"):
        load_caption_images(tmp_path / "orphan.json")
    (tmp_path / "no_categories.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="no_categories.json"):
        load_categories(tmp_path / "no_categories.json")


def test_shapes_world_captions_give_its_labels(tmp_path):
    from ovd.data.shapes import make_shapes_world

    root = make_shapes_world(tmp_path / "shapes", num_train=40, num_val=1, image_size=64, seed=5)
    path = root / "annotations" / "train_image_labels.json"
    images = load_caption_images(path)
    dataset, stats = captions_to_image_labels(images, load_categories(root / "meta.json"), keep_empty=True)
    reference = json.loads(path.read_text())["images"]
    agreement = compare_image_labels(dataset["images"], reference)
    assert agreement == {"images": 40, "compared": 40, "exact": 1.0, "precision": 1.0, "recall": 1.0}
    assert stats.ambiguous_forms == []


def test_cli(tmp_path, capsys):
    main = load_tool("captions_to_image_labels").main
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4, "captions": ["three knives"]},
                   {"id": 2, "file_name": "b.png", "height": 4, "width": 4, "captions": ["nothing here"]}]}))
    (tmp_path / "cats.json").write_text(json.dumps({"categories": CATEGORIES}))
    (tmp_path / "syn.json").write_text(json.dumps({"knife": ["blade"]}))
    (tmp_path / "reference.json").write_text(json.dumps({"images": [{"id": 1, "pos_category_ids": [ID["knife"]]},
                                                                    {"id": 2, "pos_category_ids": [ID["dog"]]}]}))
    main(["--captions", str(tmp_path / "captions.json"), "--categories", str(tmp_path / "cats.json"),
          "--synonyms", str(tmp_path / "syn.json"), "--out", str(tmp_path / "out.json"),
          "--reference", str(tmp_path / "reference.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert [(i["id"], i["pos_category_ids"]) for i in out["images"]] == [(1, [ID["knife"]])]
    printed = capsys.readouterr().out
    assert "labelled images  1" in printed and "empty images     1 (dropped)" in printed
    assert "exact 0.5000, precision 1.0000, recall 0.5000 over 2 images" in printed
