"""Files from elsewhere are data, never code: no loader in the package, the tools or the benchmarks can run
code hidden in a file, and image paths in annotation files stay inside their image folder.

The source check parses each file with `ast`, so calls spread over several lines, aliases (``import pickle as pk``,
``from yaml import load``) and subclasses (``class U(pickle.Unpickler)``) are caught, and comments or strings that
mention a loader are not.
"""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest

from ovd.data.catalog import DatasetSpec
from ovd.data.datasets import load_coco_json, load_image_labels

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("ovd", "tools", "benchmarks")
# The one module allowed to unpickle: numpy-only weights of pretrained backbones, through an Unpickler subclass whose
# find_class refuses everything else.
RESTRICTED_UNPICKLER = "ovd/modeling/pretrained.py"

PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib")
UNPICKLERS = {f"{m}.{name}" for m in PICKLE_MODULES for name in ("load", "loads", "Unpickler")} | {"pandas.read_pickle"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
CODE_RUNNERS = {"eval", "exec", "builtins.eval", "builtins.exec"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it was imported as (``np`` -> ``numpy``, ``yload`` -> ``yaml.load``)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load``; None for anything but a dotted name."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _qualified(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _argument(call: ast.Call, keyword: str, position: int | None = None) -> ast.AST | None:
    """The argument given for ``keyword`` (or at ``position``), None if not given."""
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return call.args[position] if position is not None and len(call.args) > position else None


def _is_constant(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, path: str) -> list[str]:
    """``line: what`` for each way ``source`` could run code from a file it reads (or from a string)."""
    tree = ast.parse(source, filename=path)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        name = _qualified(node, aliases) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if name in UNPICKLERS and path != RESTRICTED_UNPICKLER:
            found.append(f"{node.lineno}: {name} (unpickling runs code; only {RESTRICTED_UNPICKLER} may unpickle)")
        if not isinstance(node, ast.Call):
            continue
        func = _qualified(node.func, aliases)
        if func == "torch.load" and not _is_constant(_argument(node, "weights_only"), True):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        elif func == "numpy.load" and _argument(node, "allow_pickle", 2) is not None \
                and not _is_constant(_argument(node, "allow_pickle", 2), False):
            found.append(f"{node.lineno}: numpy.load with allow_pickle other than False")
        elif func in ("yaml.load", "yaml.load_all") \
                and _qualified(_argument(node, "Loader", 1) or ast.Constant(None), aliases) not in SAFE_YAML_LOADERS:
            found.append(f"{node.lineno}: {func} without Loader=yaml.SafeLoader (use yaml.safe_load)")
        elif func in UNSAFE_YAML:
            found.append(f"{node.lineno}: {func} (use yaml.safe_load)")
        elif func in CODE_RUNNERS:
            found.append(f"{node.lineno}: {func}()")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def overrides_find_class(source: str) -> bool:
    """Whether ``source`` defines an Unpickler subclass whose ``find_class`` can refuse (raises)."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_qualified(b, aliases) in UNPICKLERS for b in node.bases):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "find_class" \
                        and any(isinstance(n, ast.Raise) for n in ast.walk(item)):
                    return True
    return False


def _sources() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))


def test_the_scan_covers_the_code():
    files = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert {"ovd/engine/checkpoint.py", "ovd/clip/text.py", "tools/demo.py", "benchmarks/bench_inference.py"} <= files


def test_no_loader_can_run_code_from_a_file():
    found = [f"{p.relative_to(ROOT).as_posix()}:{f}" for p in _sources()
             for f in unsafe_loads(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert found == []


def test_the_restricted_unpickler_restricts():
    path = ROOT / RESTRICTED_UNPICKLER
    # The allowance above is for this one file and only while it overrides find_class; until it is written nothing
    # may unpickle at all (checked above).
    if path.is_file():
        assert overrides_find_class(path.read_text()), f"{RESTRICTED_UNPICKLER} must subclass Unpickler and override " \
                                                       "find_class to refuse all but the numpy types it needs"


BAD_SOURCE = textwrap.dedent('''\
    import pickle as pk
    import numpy as np
    import torch, yaml
    from yaml import load as yload

    state = torch.load(
        "x.pth",
        map_location="cpu",
    )
    ok = torch.load("x.pth", weights_only=True)
    arr = np.load(
        "a.npy",
        allow_pickle=True,
    )
    fine = np.load("a.npy", allow_pickle=False)
    obj = pk.loads(b"")  # pickle.load in a comment is not a call
    class Loose(pk.Unpickler):
        pass
    cfg = yload(open("c.yaml"))
    safe = yaml.load(open("c.yaml"), Loader=yaml.SafeLoader)
    full = yaml.full_load("a: 1")
    x = eval(
        "1 + 1")
    model.eval()
    text = "exec(evil)"
''')


def test_the_check_finds_multi_line_and_aliased_calls():
    found = unsafe_loads(BAD_SOURCE, "ovd/somewhere.py")
    assert [f.split(" (")[0] for f in found] == [
        "6: torch.load without weights_only=True",
        "11: numpy.load with allow_pickle other than False",
        "16: pickle.loads",
        "17: pickle.Unpickler",
        "19: yaml.load without Loader=yaml.SafeLoader",
        "21: yaml.full_load",
        "22: eval()",
    ]
    # the restricted module may name the pickle API; everything else is still refused there
    assert [f.split(":")[0] for f in unsafe_loads(BAD_SOURCE, RESTRICTED_UNPICKLER)] == ["6", "11", "19", "21", "22"]


def test_the_check_recognises_a_restricted_unpickler():
    restricted = textwrap.dedent('''\
        import pickle

        class NumpyOnly(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in {("numpy", "ndarray")}:
                    raise pickle.UnpicklingError(f"refusing {module}.{name}")
                return super().find_class(module, name)
    ''')
    assert overrides_find_class(restricted)
    assert not overrides_find_class(restricted.replace("def find_class", "def other"))
    assert not overrides_find_class("import pickle\nclass Open(pickle.Unpickler):\n    def find_class(self, m, n):\n"
                                    "        return super().find_class(m, n)\n")


# ---- image paths in annotation files ------------------------------------------------------------------------------

def _dataset(tmp_path: Path, file_name: str, *, image_labels: bool = False):
    image = {"id": 1, "file_name": file_name, "height": 8, "width": 8}
    if image_labels:
        image["pos_category_ids"] = [1]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [image], "annotations": [], "categories": [{"id": 1, "name": "cube"}]}))
    spec = DatasetSpec("ann", path, tmp_path / "images")
    return load_image_labels(spec) if image_labels else load_coco_json(spec)


@pytest.mark.parametrize("image_labels", [False, True], ids=["coco", "image-labels"])
@pytest.mark.parametrize("file_name", [
    "../x.png",
    "../images_other/x.png",  # a sibling folder whose name starts like the root's: no string-prefix check
    "sub/../../x.png",
    "./../x.png",
    "/etc/passwd",
])
def test_image_paths_cannot_leave_the_image_root(tmp_path, file_name, image_labels):
    with pytest.raises(ValueError) as info:
        _dataset(tmp_path, file_name, image_labels=image_labels)
    message = str(info.value)
    assert f"{tmp_path / 'ann.json'}: image file_name {file_name!r} points outside the image folder" in message


@pytest.mark.parametrize("file_name, inside", [
    ("a.png", "a.png"), ("sub/a.png", "sub/a.png"), ("sub/../a.png", "a.png"),
])
def test_image_paths_inside_the_root_are_kept(tmp_path, file_name, inside):
    assert _dataset(tmp_path, file_name).records[0].file_name == (tmp_path / "images" / inside).resolve()


def test_an_image_root_reached_through_a_symlink_works(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "images").symlink_to(tmp_path / "real")
    assert _dataset(tmp_path, "a.png").records[0].file_name == tmp_path / "real" / "a.png"
    with pytest.raises(ValueError, match=r"'\.\./\.\./x\.png' points outside"):
        _dataset(tmp_path, "../../x.png")
