"""requirements*.txt: every third-party package the code imports is declared, and the ranges and the lock agree."""

import ast
import glob
import os
import re
import sys

from conftest import ROOT

DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "ema_pytorch": "ema-pytorch",
                "pytorch_fid": "pytorch-fid"}
LOCAL = ({"tools", "train", "sample", "probe"} | {f"{k}{c}" for k in ("block", "unet") for c in "CEG"}
         | {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tests", "*.py"))})  # the tests' own helpers


def imported(paths):
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    third_party = names - LOCAL - set(sys.stdlib_module_names)
    return {DISTRIBUTION.get(n, n).lower() for n in third_party}


def declared(name):
    with open(os.path.join(ROOT, name)) as f:
        return {re.split(r"[<>=~!; ]", line.strip(), maxsplit=1)[0].lower() for line in f if line.strip() and not line.startswith("#")}


def test_every_import_is_declared():
    code = [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
            if not os.path.relpath(p, ROOT).startswith((".venv", "tests"))]
    tests = glob.glob(os.path.join(ROOT, "tests", "*.py"))
    ranges, lock, test = declared("requirements.txt"), declared("requirements-lock.txt"), declared("requirements-test.txt")
    assert imported(code) <= ranges, imported(code) - ranges
    assert imported(tests) <= ranges | test, imported(tests) - ranges - test
    assert ranges == lock  # the lock pins exactly the packages the ranges name
    assert "pytest" in test and "pytest" not in ranges
