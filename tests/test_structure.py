"""The package's layering: no module imports another that (directly or through others) imports it
back. The trainer sits above what it uses; evaluation never imports the trainer; only the
command-line entries (gendd_fast.cli) and the demo driver call the trainer. Every folder of the
package is walked, the top-level kernels/ (gendd_fast.kernels) included, and none is a symlink.

Planted: `from ..fused_head import FusedDiffLoss` inside a function of kernels/utils.py (the old
fused_head -> launch_check -> fused_head loop had this shape) in a copy of the sources; the cycle
test reports gendd_fast.fused_head -> gendd_fast.kernels... -> gendd_fast.fused_head, and the
kernels-import-nothing-above test names it too (test_a_planted_cycle_through_kernels_is_found
runs that plant on every run)."""
import ast
import os
import re
import shutil

import gendd_fast
import gendd_fast.kernels
from gendd_fast import layout

PKG_DIR = os.path.dirname(gendd_fast.__file__)
KERNELS_DIR = os.path.dirname(gendd_fast.kernels.__file__)
ROOTS = {"gendd_fast": PKG_DIR, "gendd_fast.kernels": KERNELS_DIR}


def _module_name(path, prefix, root):
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    rel = rel[:-len(".__init__")] if rel.endswith(".__init__") else ("" if rel == "__init__" else rel)
    return prefix + ("." + rel if rel else "")


def _is_script_guard(node):
    # `if __name__ == "__main__":` runs only when the file is the script (module '__main__'),
    # never when the package module is imported, so it cannot close a cycle.
    t = node.test
    return (isinstance(node, ast.If) and isinstance(t, ast.Compare)
            and isinstance(t.left, ast.Name) and t.left.id == "__name__")


def _imports(path, name, is_pkg, known=()):
    tree = ast.parse(open(path).read())
    out = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_script_guard(node):
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gendd_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("gendd_fast"):
                # `from pkg import sub` depends on the submodule; `from pkg import name` on pkg
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    if sub in known:
                        out.add(sub)
                    elif not name.startswith(mod + "."):
                        # a name from an enclosing package (e.g. the compiled `_C`) needs no edge:
                        # Python has initialised the package before any of its submodules
                        out.add(mod)
        stack.extend(ast.iter_child_nodes(node))  # imports inside functions count too
    return out


def package_files(roots=None):
    """{module name: (path, is_package)} for every .py file under each root (every folder; a
    symlink is an error, not something to skip)."""
    files = {}
    for prefix, top in (roots or ROOTS).items():
        for root, dirs, names in os.walk(top, followlinks=False):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for n in dirs + names:
                assert not os.path.islink(os.path.join(root, n)), \
                    f"symlink in the package: {os.path.join(root, n)}"
            for n in names:
                if n.endswith(".py"):
                    p = os.path.join(root, n)
                    files[_module_name(p, prefix, top)] = (p, n == "__init__.py")
    return files


def import_graph(roots=None):
    files = package_files(roots)
    graph = {}
    for name, (path, is_pkg) in files.items():
        graph[name] = {m for m in _imports(path, name, is_pkg, files) if m in files and m != name}
    return graph


def find_cycle(graph):
    colour, stack = {}, []

    def visit(n):
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in colour:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if n not in colour:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "gendd_fast.train" in graph and "gendd_fast.cli" in graph
    assert "gendd_fast.kernels.matmul" in graph and "gendd_fast.models.cifar" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def kernels_reaching_above(graph):
    """Edges from gendd_fast.kernels.* to a module outside kernels/."""
    return sorted((a, b) for a, deps in graph.items() if a.startswith("gendd_fast.kernels")
                  for b in deps if not b.startswith("gendd_fast.kernels"))


def test_kernels_import_nothing_above_themselves():
    graph = import_graph()
    assert {"gendd_fast.fused_head", "gendd_fast.launch_check"} <= set(graph)
    assert any(m.startswith("gendd_fast.kernels") for m in graph["gendd_fast.launch_check"])
    assert kernels_reaching_above(graph) == []


def test_a_planted_cycle_through_kernels_is_found(tmp_path):
    """The detector on a copy of the sources with the old loop planted back (a function of
    kernels/utils.py importing the fused head, which imports the kernels)."""
    pkg, kern = tmp_path / "gendd_fast", tmp_path / "kernels"
    shutil.copytree(PKG_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(KERNELS_DIR, kern, ignore=shutil.ignore_patterns("__pycache__"))
    roots = {"gendd_fast": str(pkg), "gendd_fast.kernels": str(kern)}
    assert find_cycle(import_graph(roots)) is None
    with open(kern / "utils.py", "a") as fh:
        fh.write("\n\ndef _planted():\n    from ..fused_head import FusedDiffLoss\n"
                 "    return FusedDiffLoss\n")
    graph = import_graph(roots)
    cycle = find_cycle(graph)
    assert cycle is not None and "gendd_fast.fused_head" in cycle
    assert any(m.startswith("gendd_fast.kernels") for m in cycle), cycle
    assert kernels_reaching_above(graph) == [("gendd_fast.kernels.utils", "gendd_fast.fused_head")]


def test_no_symlinks_and_setup_maps_the_top_level_folders():
    """The mapped folders are real folders at the top, and setup.py's package_dir maps the same
    ones layout.py resolves."""
    for name in layout.MAPPED:
        path = os.path.join(layout.TOP_DIR, name)
        assert not os.path.islink(os.path.join(PKG_DIR, name)), name
        if layout.is_checkout():
            assert os.path.isdir(path) and not os.path.islink(path), path
        assert os.path.isdir(layout.folder(name)), name
    if layout.is_checkout():
        text = open(os.path.join(layout.TOP_DIR, "setup.py")).read()
        mapped = dict(re.findall(r'"gendd_fast\.(\w+)": "(\w+)"', text))
        assert mapped == {n: n for n in layout.MAPPED}, mapped


def test_evaluation_does_not_import_the_trainer():
    graph = import_graph()
    for low in ("gendd_fast.evaluate", "gendd_fast.build", "gendd_fast.optim",
                "gendd_fast.precision"):
        assert "gendd_fast.train" not in graph[low], low
        assert "gendd_fast.cli" not in graph[low], low


def test_the_cycle_finder_sees_a_cycle():
    # the detector itself must be able to fail: a planted two-module cycle is reported
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
