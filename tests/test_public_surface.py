"""Lessons stand on a stable surface: tutorials/ and bench/ use only the top-level `minift` names
(minift.__all__) and the modules README.md lists under "How the engine is laid out", by names those modules
define themselves and do not mark private. A refactor inside a module then cannot break a lesson unnoticed."""
import ast
import re
from pathlib import Path

import pytest

import minift

ROOT = Path(__file__).resolve().parents[1]


def layout_modules():
    """The modules README.md's layout section names, in its order (`layers.py` -> "layers", `models/llama.py` ->
    "models.llama")."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## How the engine is laid out", 1)[1].split("\n## ", 1)[0]
    return list(dict.fromkeys(m.replace("/", ".") for m in re.findall(r"`((?:models/)?\w+)\.py`", section)))


def documented_modules():
    return set(layout_modules())


def source_of(module):
    return (ROOT / "minift" / (module.replace(".", "/") + ".py")).read_text()


def defined_names(module):
    """The names a module defines at its top level (functions, classes, assignments), not the ones it imports."""
    tree = ast.parse(source_of(module))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def violations(source, modules):
    """What a script uses of minift beyond its public surface, one line each."""
    top = set(minift.__all__) | modules
    found = []

    def check(module, name, line):
        if module is None:
            if name not in top:
                found.append(f"line {line}: minift.{name} is neither in minift.__all__ nor a documented module")
        elif module not in modules:
            found.append(f"line {line}: minift.{module} is not a module README.md documents")
        elif name is not None and (name.startswith("_") or name not in defined_names(module)):
            found.append(f"line {line}: {name} is private to minift.{module} or not defined there")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minift":
            parts = node.module.split(".")
            for alias in node.names:
                if len(parts) == 1:
                    check(None, alias.name, node.lineno)
                elif node.module == "minift.models":  # from minift.models import llama
                    check(f"models.{alias.name}", None, node.lineno)
                else:
                    check(".".join(parts[1:]), alias.name, node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "minift" and len(parts) > 1:
                    check(".".join(parts[1:]), None, node.lineno)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "minift":
            check(None, node.attr, node.lineno)  # minift.X
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "minift" \
                and node.value.attr in modules:
            check(node.value.attr, node.attr, node.lineno)  # minift.module.name
    return found


SCRIPTS = sorted([*(ROOT / "tutorials").glob("*.py"), *(ROOT / "bench").glob("*.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lessons_and_benches_use_the_public_surface(script):
    assert violations(script.read_text(), documented_modules()) == []


def test_the_check_catches_what_it_should():
    modules = documented_modules()
    assert {"train", "classify", "corpora", "outputs", "files", "lora", "config"} <= modules
    bad = ("from minift.train import TrainConfig\n"  # imported there, defined in config.py
           "from minift.lora import _is_new_head\n"  # private
           "from minift.finetune import finetune_classifier\n"  # no such module
           "import minift\nminift.hub._nothing\nminift.secret()\n")
    assert len(violations(bad, modules)) == 5
    good = ("import minift\nfrom minift.config import TrainConfig\nfrom minift import recipe, TrainData\n"
            "minift.train(None, None, None, None)\nminift.hub.fetch_minilm()\n")
    assert violations(good, modules) == []


def imported_modules(module):
    """The minift modules `module` imports by relative import, named as layout_modules names them."""
    package = module.split(".")[:-1]  # [] for minift/x.py, ["models"] for minift/models/x.py
    for node in ast.walk(ast.parse(source_of(module))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                yield ".".join(base + node.module.split("."))
                yield from (".".join(base + node.module.split(".") + [a.name]) for a in node.names)
            else:
                yield from (".".join(base + [a.name]) for a in node.names)


def test_readme_reading_order_holds():
    """README.md lists minift/ in reading order, "no module imports one below it": checked, not claimed."""
    order = layout_modules()
    assert len(order) == len(list((ROOT / "minift").glob("*.py"))) - 2 + len(list((ROOT / "minift" / "models").glob(
        "[!_]*.py"))), "every module is in the layout (but __init__ and __main__)"
    position = {m: i for i, m in enumerate(order)}
    wrong = []
    for module in order:
        for name in imported_modules(module):
            if position.get(name, -1) > position[module]:
                wrong.append(f"{module} imports {name}, listed below it")
    assert wrong == []
