"""The layout of the code: no import circles, no sys.path edits outside tests, nothing imports an entry script,
function-local imports only with their reason, and the README's Layout table lists the files there are."""

import ast
import glob
import os
import re

from conftest import ROOT

ENTRY_SCRIPTS = {"train", "sample", "probe"}


def product_files():
    """The repository's Python files outside tests/, as {module name: path}."""
    files = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
    files.update({f"tools.{os.path.basename(p)[:-3]}": p for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))})
    return files


def imports(path):
    """[(node, module imported, whether inside a function)] of a file; `from tools import x` counts as tools.x."""
    tree = ast.parse(open(path).read(), path)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, a.name, id(node) in inside) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "tools" else [node.module]
            found += [(node, n, id(node) in inside) for n in names]
    return found


def local_graph():
    files = product_files()
    return {m: sorted({n for _, n, _ in imports(p) if n in files} - {m}) for m, p in files.items()}


def test_no_import_circle():
    """Imports run one way, counting the imports inside functions: a depth-first search finds no cycle."""
    graph, state, cycles = local_graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert "tools.config" in graph["tools.runs"]  # the graph sees `from tools.x import ...`


def test_nothing_imports_an_entry_script_or_edits_sys_path():
    offenders = []
    for module, path in product_files().items():
        tree = ast.parse(open(path).read(), path)
        offenders += [f"{module} imports {n}" for _, n, _ in imports(path) if n in ENTRY_SCRIPTS]
        for node in ast.walk(tree):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else \
                     node.targets[0] if isinstance(node, ast.Assign) else node.target if isinstance(node, ast.AugAssign) else None
            if isinstance(target, ast.Subscript):
                target = target.value
            if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", None) == "sys":
                offenders.append(f"{module}:{node.lineno} edits sys.path")
    assert not offenders, offenders


def test_function_local_imports_say_why():
    """Product code imports at the top; an import inside a function is of a slow third-party package, with its
    reason on the line ('# lazy: ...')."""
    offenders = []
    for module, path in product_files().items():
        lines = open(path).read().splitlines()
        for node, name, local in imports(path):
            if not local:
                continue
            if name.split(".")[0] in {"tools", *ENTRY_SCRIPTS} or "# lazy:" not in lines[node.lineno - 1]:
                offenders.append(f"{module}:{node.lineno} {name}")
    assert not offenders, offenders


def test_no_tool_imports_unittest():
    """Product code uses pytorch-fid through the torch hub cache, not by patching it."""
    offenders = [f"{m}: {n}" for m, p in product_files().items() for _, n, _ in imports(p) if n.split(".")[0] == "unittest"]
    assert not offenders, offenders


def test_readme_layout_table_matches_the_tree():
    """Every Python file is named in the README's Layout table, and everything the table names exists."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text[text.index("## Layout"):]
    table = table[:table.index("\n## ", 1)]
    named = set(re.findall(r"`([\w./-]+\.py)`", table))
    present = {os.path.relpath(p, ROOT) for p in product_files().values()} - {"tools/__init__.py"}
    assert present - named == set(), "files missing from the README Layout table"
    assert named - present == set(), "the README Layout table names files that do not exist"
