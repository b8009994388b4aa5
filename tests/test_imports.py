"""The import structure of ``spectra``, ``train`` and ``experiments``, read with ``ast``.

Nothing is imported: every ``.py`` file of the three packages is parsed, and every import
statement in it (at module level or inside a function, ``if __name__ == "__main__"`` branches
included; ``if TYPE_CHECKING:`` blocks left out) becomes an edge to the module it names:
``from a.b import c`` names the module ``a.b.c`` when there is one, else ``a.b``; relative
imports are resolved against the file's package. A parent package's ``__init__``, which Python
runs before any of its submodules, is not an edge of its own (every module of ``train`` would
otherwise reach all of ``train/__init__.py``'s face): a module depends on the face only when it
imports a name from it.

Checked here:

* no import cycle among the modules;
* the direction is ``experiments -> train -> spectra``: ``spectra`` imports nothing of ``train``
  or ``experiments`` and neither Flax nor optax, ``train`` nothing of ``experiments``;
* the training loop, its config and its steps (``train.loop``, ``train.config``,
  ``train.steps``, and every module of ``train`` they reach) import nothing of the report
  (``train.report``) or of the ONNX import (``train.models.onnx``);
* no module over :data:`MAX_LINES` lines lacks a ``Length:`` line in its docstring saying why it
  is that long (:data:`LENGTH_PENDING`: modules being split).
"""

import ast
import pathlib
import re
import tempfile

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("spectra", "train", "experiments")
#: The training loop's core: it and what it reaches must not depend on the report or ONNX.
LOOP_CORE = ("train.loop", "train.config", "train.steps")
#: Packages the loop core must not reach.
NOT_FROM_LOOP = ("train.report", "train.models.onnx")
#: The loop core's one allowed door into the report: certifying ``TrainConfig.lipschitz_target``
#: at the end of a run needs the network certifier (``train.report``); training does not.
CERTIFIER_EDGES = frozenset({("train.lipschitz_target", "train.report")})
#: Third-party packages that ``spectra`` (pure JAX functions) must not import.
NOT_IN_SPECTRA = ("flax", "optax")
#: Modules longer than this say why in a ``Length:`` line of their docstring.
MAX_LINES = 600
#: A docstring line saying why a module is long: ``Length: ...`` or ``Length (~630 lines): ...``.
LENGTH_LINE = re.compile(r"Length\b[^:]*:")
#: Modules over :data:`MAX_LINES` whose split or ``Length:`` line is pending elsewhere.
LENGTH_PENDING: frozenset[str] = frozenset()


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    """``{dotted name: file}`` of every module of :data:`PACKAGES` (packages by ``__init__``)."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[_module_name(path)] = path
    return files


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every ``Import`` / ``ImportFrom`` node of ``tree``, outside ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if _is_type_checking(node):
            children = list(node.orelse)
        stack.extend(children)


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]):
    """``(internal, external)``: the modules of :data:`PACKAGES` that ``name`` imports, and the
    top-level names of the other packages it imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()

    def add(target: str) -> None:
        if target.split(".")[0] in PACKAGES:
            while target not in modules and "." in target:  # e.g. ``import train.x.attr``.
                target = target.rpartition(".")[0]
            internal.add(target)
        else:
            external.add(target.split(".")[0])

    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module
        for alias in node.names:
            child = f"{source}.{alias.name}"
            add(child if child in modules else source)
    internal.discard(name)  # ``from train.report import _x`` inside train/report/__init__.py.
    return internal, external


def _graph():
    modules = _modules()
    edges, external = {}, {}
    for name, path in modules.items():
        edges[name], external[name] = _imports(name, path, modules)
    return modules, edges, external


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:  # Iterative: no recursion limit on long chains.
        work = [(v, iter(sorted(edges.get(v, ()))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def _reach(edges: dict[str, set[str]], start, within: str) -> dict[str, str]:
    """``{module: the module that imports it}`` for every module of package ``within`` reached
    from ``start`` (``start`` included, mapped to itself)."""
    seen = {s: s for s in start}
    todo = list(start)
    while todo:
        v = todo.pop()
        for w in edges.get(v, ()):
            if w not in seen and (w == within or w.startswith(within + ".")):
                seen[w] = v
                todo.append(w)
    return seen


def _chain(parents: dict[str, str], module: str) -> str:
    chain = [module]
    while parents[chain[-1]] != chain[-1]:
        chain.append(parents[chain[-1]])
    return " <- ".join(chain)


def _inside(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


class ImportGraphTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.modules, cls.edges, cls.external = _graph()

    def test_the_graph_is_read(self):
        # The parser resolves what the packages really import (a guard against an empty graph).
        self.assertGreater(len(self.modules), 60)
        self.assertIn("train.steps", self.edges["train.loop"])
        self.assertIn("spectra._spec", self.edges["spectra._exact"])
        self.assertIn("jax", self.external["spectra._exact"])
        self.assertIn("train.report._api", self.edges["train.report"])
        self.assertIn("train.model_io", self.edges["train.report._sources"])

    def test_resolution(self):
        modules = {"train": None, "train.a": None, "train.b": None, "train.pkg": None,
                   "train.pkg.c": None}
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        source = pathlib.Path(tmp.name) / "m.py"
        source.write_text(
            "import numpy.linalg\nfrom train import a\nfrom train.b import f\n"
            "from . import b\nfrom .pkg import c\nfrom .pkg import g\n"
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from train import x\n"
            "def h():\n    import train.pkg.c.attr\n"
        )
        internal, external = _imports("train.m", source, modules)
        self.assertEqual(internal, {"train.a", "train.b", "train.pkg", "train.pkg.c"})
        self.assertEqual(external, {"numpy", "typing"})
        self.assertEqual(_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}),
                         [["a", "b", "c"]])
        self.assertEqual(_cycles({"a": {"b"}, "b": set()}), [])

    def test_no_import_cycle(self):
        cycles = _cycles(self.edges)
        self.assertEqual(cycles, [], f"import cycles: {cycles}")

    def test_direction_experiments_train_spectra(self):
        bad = []
        for name, targets in sorted(self.edges.items()):
            if _inside(name, ("spectra",)):
                bad += [f"{name} -> {t}" for t in sorted(targets) if not _inside(t, ("spectra",))]
                bad += [f"{name} -> {t}" for t in sorted(self.external[name])
                        if t in NOT_IN_SPECTRA]
            elif _inside(name, ("train",)):
                bad += [f"{name} -> {t}" for t in sorted(targets) if _inside(t, ("experiments",))]
        self.assertEqual(bad, [])

    def test_loop_core_does_not_reach_report_or_onnx(self):
        edges = {v: {w for w in ws if (v, w) not in CERTIFIER_EDGES}
                 for v, ws in self.edges.items()}
        parents = _reach(edges, LOOP_CORE, "train")
        bad = [_chain(parents, m) for m in sorted(parents) if _inside(m, NOT_FROM_LOOP)]
        self.assertEqual(bad, [])
        self.assertIn("train.optim", parents)  # The walk follows the loop's own imports.


class ModuleLengthTest(absltest.TestCase):

    def test_long_modules_say_why(self):
        bad = []
        for name, path in sorted(_modules().items()):
            lines = len(path.read_text().splitlines())
            if lines <= MAX_LINES or name in LENGTH_PENDING:
                continue
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if not any(LENGTH_LINE.match(line.strip()) for line in doc.splitlines()):
                bad.append(f"{path.relative_to(ROOT)} ({lines} lines)")
        self.assertEqual(bad, [], f"over {MAX_LINES} lines without a 'Length:' docstring line")


if __name__ == "__main__":
    absltest.main()
