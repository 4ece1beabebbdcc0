"""The package's layering: no module imports another that (directly or through others) imports it
back. The trainer sits above what it uses; evaluation never imports the trainer; only the
command-line entries (gendd_fast.cli) and the demo driver call the trainer."""
import ast
import os

import gendd_fast

PKG_DIR = os.path.dirname(gendd_fast.__file__)


def _module_name(path):
    rel = os.path.relpath(path, PKG_DIR)[:-3].replace(os.sep, ".")
    rel = rel[:-len(".__init__")] if rel.endswith(".__init__") else ("" if rel == "__init__" else rel)
    return "gendd_fast" + ("." + rel if rel else "")


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


def import_graph():
    files = {}
    for root, dirs, names in os.walk(PKG_DIR, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith("__") and
                   not os.path.islink(os.path.join(root, d))]
        for n in names:
            if n.endswith(".py"):
                p = os.path.join(root, n)
                files[_module_name(p)] = (p, n == "__init__.py")
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
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


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
