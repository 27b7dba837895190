"""Image-level labels from captions (DESIGN §2 "Image-level data: COCO captions matched to class names").

A caption names a category when one of the category's *surface forms* occurs in it as whole words:

* its name, with any parenthesised qualifier removed (LVIS ``bow_(weapon)`` is written ``bow``) and underscores or
  hyphens read as spaces, and the plural of the name's last word (``teddy bears``, ``buses``, ``puppies``, ``knives``,
  ``people``; see :func:`plural_forms`);
* a multi-word name written as one word (``hotdog``, ``cellphone``), and its plural: joined spellings are common in
  captions and are almost never another word, whereas a word *inside* another word (``cat`` in ``category``, ``car``
  in ``scar``) never matches;
* its synonyms (a category's own ``synonyms`` field, as LVIS has, and an optional ``{name: [synonym, ...]}`` file),
  with their plurals.

Matching works on words: a caption is lower-cased and split at everything that is not a letter or digit, so case
and punctuation (``"Dog."``, ``"dog,"``, ``"dog's"``, ``"hot-dog"``) do not matter. Where matches overlap, the longest
(in words) wins and the shorter ones are discarded, so ``"a hot dog"`` names *hot dog* only, not *dog*; among equally
long overlapping matches the leftmost wins. A form shared by several categories names those for which it is the
most direct form (their name before its plural or joined spelling, before a synonym), all of them when tied.
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ovd.utils.io import read_json

__all__ = [
    "CaptionLabelStats",
    "CaptionMatcher",
    "captions_to_image_labels",
    "compare_image_labels",
    "load_caption_images",
    "load_categories",
    "load_synonyms",
    "plural_forms",
    "tokenize",
]

_WORD = re.compile(r"[^\W_]+")
_QUALIFIER = re.compile(r"\([^)]*\)")

_IRREGULAR_PLURALS: dict[str, tuple[str, ...]] = {
    "person": ("people", "persons"), "man": ("men",), "woman": ("women",), "child": ("children",),
    "mouse": ("mice",), "louse": ("lice",), "goose": ("geese",), "foot": ("feet",), "tooth": ("teeth",),
    "ox": ("oxen",), "die": ("dice",), "cactus": ("cacti", "cactuses"), "fungus": ("fungi",),
    "knife": ("knives",), "wife": ("wives",), "life": ("lives",), "leaf": ("leaves",), "shelf": ("shelves",),
    "wolf": ("wolves",), "loaf": ("loaves",), "calf": ("calves",), "half": ("halves",), "scarf": ("scarves",),
    "thief": ("thieves",), "hoof": ("hooves", "hoofs"), "elf": ("elves",),
}
# Same word in the plural.
_INVARIANT_PLURALS = frozenset(
    "sheep fish deer moose bison salmon trout aircraft series species shrimp squid swine cod".split()
)
_VOWELS = frozenset("aeiou")

# Precedence of a surface form when several categories share it (lower wins).
_TIER_NAME, _TIER_DERIVED, _TIER_SYNONYM = 0, 1, 2


def tokenize(text: str) -> tuple[str, ...]:
    """Lower-cased words of ``text``: maximal runs of letters and digits (``_``, ``-``, ``'`` and spaces separate)."""
    return tuple(_WORD.findall(text.lower()))


def plural_forms(word: str) -> set[str]:
    """Plural spellings of one lower-case word: the irregular table (``knife → knives``, ``person → people``),
    invariant plurals (``sheep``), ``-ies`` after a consonant (``puppy → puppies``), ``-es`` after a sibilant
    (``bus → buses``, ``box → boxes``), both ``-s`` and ``-es`` after ``o``, ``-men`` for ``-man``, else ``-s``.

    Rules are kept narrow on purpose: a wrong plural that is another real word (``car → cares``) would label images
    falsely, a wrong one that is no word costs nothing.
    """
    if word in _IRREGULAR_PLURALS:
        return set(_IRREGULAR_PLURALS[word])
    if word in _INVARIANT_PLURALS or not word.isalpha():
        return set()
    if word.endswith("y") and len(word) > 1 and word[-2] not in _VOWELS:
        return {word[:-1] + "ies"}
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return {word + "es"}
    if word.endswith("o"):
        return {word + "s", word + "es"}
    if word.endswith("man") and len(word) > 3:
        return {word[:-3] + "men", word + "s"}
    return {word + "s"}


def _name_tokens(name: str) -> tuple[str, ...]:
    """Words of a category name or synonym, a parenthesised qualifier dropped unless it is all there is."""
    return tokenize(_QUALIFIER.sub(" ", name)) or tokenize(name)


def _with_plurals(tokens: tuple[str, ...]) -> set[tuple[str, ...]]:
    return {tokens[:-1] + (p,) for p in plural_forms(tokens[-1])}


class CaptionMatcher:
    """Finds the categories a text names (see the module docstring for the rules).

    >>> m = CaptionMatcher([{"id": 1, "name": "dog"}, {"id": 2, "name": "hot dog"}])
    >>> m.match("Two hot-dogs and a dog.")
    [1, 2]
    """

    def __init__(
        self, categories: Sequence[Mapping[str, Any]], *, synonyms: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        """
        Args:
            categories: dicts with ``id``, ``name`` and optionally ``synonyms`` (list of str).
            synonyms: extra synonyms by category name.

        Raises:
            ValueError: a category without id or name, duplicate ids, a name with no letters or digits, or
                ``synonyms`` naming a category that is not in ``categories``.
        """
        ids: set[int] = set()
        for c in categories:
            if "id" not in c or "name" not in c:
                raise ValueError(f"category {dict(c)!r:.200} needs an id and a name")
            if c["id"] in ids:
                raise ValueError(f"category id {c['id']} appears twice")
            ids.add(c["id"])
        unknown = sorted(set(synonyms or {}) - {c["name"] for c in categories})
        if unknown:
            raise ValueError(f"synonyms given for names that are not categories: {unknown[:10]}")
        # form -> (tier, category ids of that tier)
        forms: dict[tuple[str, ...], tuple[int, set[int]]] = {}

        def add(form: tuple[str, ...], tier: int, category_id: int) -> None:
            best, form_ids = forms.get(form, (tier + 1, set()))
            if tier < best:
                forms[form] = (tier, {category_id})
            elif tier == best:
                form_ids.add(category_id)

        for c in categories:
            name = _name_tokens(c["name"])
            if not name:
                raise ValueError(f"category {c['id']} has a name without letters or digits: {c['name']!r}")
            add(name, _TIER_NAME, c["id"])
            derived = _with_plurals(name)
            if len(name) > 1:
                joined = ("".join(name),)
                derived |= {joined} | _with_plurals(joined)
            for form in derived:
                add(form, _TIER_DERIVED, c["id"])
            for synonym in [*c.get("synonyms", ()), *(synonyms or {}).get(c["name"], ())]:
                tokens = _name_tokens(synonym)
                if tokens:
                    for form in {tokens} | _with_plurals(tokens):
                        add(form, _TIER_SYNONYM, c["id"])
        self._forms = {form: tuple(sorted(ids)) for form, (_, ids) in forms.items()}
        self._max_words = max(len(f) for f in self._forms)
        self.ambiguous_forms = sorted(" ".join(f) for f, ids in self._forms.items() if len(ids) > 1)

    def spans(self, text: str) -> list[tuple[int, int, tuple[int, ...]]]:
        """The kept matches of ``text``: ``(first word, end word, category ids)``, in word positions of
        :func:`tokenize`, ordered by position, none overlapping."""
        words = tokenize(text)
        found = [
            (start, start + n, self._forms[form])
            for start in range(len(words))
            for n in range(1, min(self._max_words, len(words) - start) + 1)
            if (form := words[start : start + n]) in self._forms
        ]
        # Longest first, then leftmost: a span is kept when none of its words is taken by a kept one.
        found.sort(key=lambda s: (-(s[1] - s[0]), s[0]))
        taken = [False] * len(words)
        kept = []
        for start, end, ids in found:
            if not any(taken[start:end]):
                taken[start:end] = [True] * (end - start)
                kept.append((start, end, ids))
        return sorted(kept)

    def match(self, *texts: str) -> list[int]:
        """Sorted ids of the categories named in any of ``texts``."""
        return sorted({i for text in texts for _, _, ids in self.spans(text) for i in ids})


@dataclass
class CaptionLabelStats:
    """What :func:`captions_to_image_labels` found.

    Attributes:
        images: images in the caption file.
        captions: captions read.
        labelled_images: images with at least one label.
        empty_images: images whose captions named no category.
        dropped_images: of those, how many were left out of the output.
        labels: image labels in all (an image names each category at most once).
        labels_per_image: ``labels / labelled_images``.
        images_per_class: ``{category name: labelled images}``, every category, in category id order.
        ambiguous_forms: surface forms shared by several categories (all of them are labelled).
    """

    images: int = 0
    captions: int = 0
    labelled_images: int = 0
    empty_images: int = 0
    dropped_images: int = 0
    labels: int = 0
    labels_per_image: float = 0.0
    images_per_class: dict[str, int] = field(default_factory=dict)
    ambiguous_forms: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_caption_images(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The images of a caption file, each with a ``captions`` list.

    Accepts COCO caption files (``annotations[]`` of ``{image_id, caption}``, as ``captions_train2017.json``) and
    image-label files whose ``images[]`` carry ``captions`` (the shapes world); both may occur in one file.

    Returns:
        the ``images`` entries in file order, copied, with ``captions`` (file order, images' own first).

    Raises:
        FileNotFoundError: no such file.
        ValueError (naming the file): no ``images`` list, an annotation of an unknown image or without a string
            ``caption``, or no caption at all.
    """
    path = Path(path)
    data = read_json(path, what="caption file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"caption file {path} has no 'images' list (expected COCO captions: images + annotations)")
    images = [{**img, "captions": list(img.get("captions", []))} for img in data["images"]]
    by_id = {img.get("id"): img for img in images}
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"caption file {path}: 'annotations' must be a list")
    for ann in annotations:
        image = by_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if image is None:
            raise ValueError(f"caption file {path}: annotation {ann!r:.200} refers to an image that is not in 'images'")
        if not isinstance(ann.get("caption"), str):
            raise ValueError(f"caption file {path}: annotation {ann.get('id')} has no 'caption' string")
        image["captions"].append(ann["caption"])
    if not any(img["captions"] for img in images):
        raise ValueError(f"caption file {path} holds no captions (neither annotations[].caption nor images[].captions)")
    return images


def load_categories(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``categories`` list of a JSON file (a COCO/LVIS annotation file, a shapes ``meta.json``), sorted by id."""
    path = Path(path)
    data = read_json(path, what="categories file")
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"categories file {path} has no non-empty 'categories' list")
    bad = [c for c in categories if not isinstance(c, dict) or "id" not in c or "name" not in c]
    if bad:
        raise ValueError(f"categories file {path}: category {bad[0]!r:.200} needs an id and a name")
    return sorted(categories, key=lambda c: c["id"])


def load_synonyms(path: str | os.PathLike) -> dict[str, list[str]]:
    """A synonyms file: JSON ``{category name: [synonym, ...]}``."""
    path = Path(path)
    data = read_json(path, what="synonyms file")
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
    ):
        raise ValueError(f"synonyms file {path} must hold a JSON object {{category name: [synonym, ...]}}")
    return data


def captions_to_image_labels(
    images: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
    *,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    keep_empty: bool = False,
    unlabelled_categories: Sequence[Mapping[str, Any]] = (),
) -> tuple[dict[str, Any], CaptionLabelStats]:
    """Label images with the categories their captions name.

    Args:
        images: image entries with ``captions`` (from :func:`load_caption_images`).
        categories: the vocabulary (every category may be matched, novel ones included).
        synonyms: extra synonyms by category name.
        keep_empty: keep images whose captions name nothing (with empty ``pos_category_ids``) instead of dropping them.
        unlabelled_categories: categories outside the vocabulary (other ids) that are matched but never labelled, so
            that their words are not read as a vocabulary name: with COCO's 65-class split, ``"a hot dog"`` and
            ``"a teddy bear"`` name the ignored classes, not *dog* and *bear*.

    Returns:
        ``(image_labels, stats)``: an image-label dataset (DESIGN §4) — ``images`` (each entry as given, plus sorted
        ``pos_category_ids``), ``annotations: []``, ``categories`` sorted by id, and ``info.caption_labels``
        (the stats) — and the stats.
    """
    categories = sorted(categories, key=lambda c: c["id"])
    matcher = CaptionMatcher([*categories, *unlabelled_categories], synonyms=synonyms)
    vocabulary = {c["id"] for c in categories}
    per_class: collections.Counter[int] = collections.Counter()
    stats = CaptionLabelStats(images=len(images), ambiguous_forms=matcher.ambiguous_forms)
    out_images = []
    for image in images:
        labels = [i for i in matcher.match(*image["captions"]) if i in vocabulary]
        stats.captions += len(image["captions"])
        per_class.update(labels)
        if labels:
            stats.labelled_images += 1
        else:
            stats.empty_images += 1
            if not keep_empty:
                stats.dropped_images += 1
                continue
        out_images.append({**image, "pos_category_ids": labels})
    stats.labels = sum(per_class.values())
    stats.labels_per_image = stats.labels / stats.labelled_images if stats.labelled_images else 0.0
    stats.images_per_class = {c["name"]: per_class[c["id"]] for c in categories}
    dataset = {
        "info": {"description": "image-level labels matched in captions", "caption_labels": stats.as_dict()},
        "images": out_images,
        "annotations": [],
        "categories": [dict(c) for c in categories],
    }
    return dataset, stats


def compare_image_labels(
    derived: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]
) -> dict[str, float | int]:
    """Agreement of derived labels with reference labels (``pos_category_ids`` of images with the same id).

    Returns:
        ``images`` (in the reference), ``compared`` (of those, in ``derived``), ``exact`` (fraction of reference
        images whose label sets are equal), ``precision`` and ``recall`` of the derived labels over the compared images.
        Reference images missing from ``derived`` (dropped as empty) count as having no label.
    """
    got = {img["id"]: set(img["pos_category_ids"]) for img in derived}
    exact = true_pos = num_derived = num_reference = 0
    for img in reference:
        if "pos_category_ids" not in img:
            raise ValueError(f"reference image {img.get('id')} has no pos_category_ids")
        want, have = set(img["pos_category_ids"]), got.get(img["id"], set())
        exact += want == have
        true_pos += len(want & have)
        num_derived += len(have)
        num_reference += len(want)
    return {
        "images": len(reference),
        "compared": sum(img["id"] in got for img in reference),
        "exact": exact / len(reference) if reference else float("nan"),
        "precision": true_pos / num_derived if num_derived else float("nan"),
        "recall": true_pos / num_reference if num_reference else float("nan"),
    }
