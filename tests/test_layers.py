"""The package's layering (docs/architecture.md): imports point down the layer list only, no module
imports form a cycle, no module reaches into another package's private names, and every
function-local import says why it is local. Checked on the source with ``ast``."""
import ast
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sevcore"

#: The layers, lowest first. A module may import modules of its own layer (package) or of a
#: lower one. ``_reference`` holds the test oracles of ``core``.
LAYERS = [
    ("base", ("sevcore.uapi", "sevcore.errors", "sevcore._bindings", "sevcore._native",
              "sevcore._compat")),
    ("core", ("sevcore.core",)),
    ("reference", ("sevcore._reference",)),
    ("hw", ("sevcore.hw",)),
    ("psp", ("sevcore.psp",)),
    ("kvm", ("sevcore.kvm",)),
    ("host", ("sevcore.host",)),
    ("vmm", ("sevcore.vmm",)),
    ("migration", ("sevcore.migration",)),
    ("sim", ("sevcore.sim",)),
    ("cli", ("sevcore.cli", "sevcore.__main__", "sevcore.demo", "sevcore.sweep",
             "sevcore.plots")),
]


def layer_of(module):
    """The index of ``module``'s layer in LAYERS, or None (the package root, a re-export)."""
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def package_of(module):
    """``sevcore.kvm.vm`` -> ``sevcore.kvm``; ``sevcore.host`` -> ``sevcore.host``."""
    parts = module.split(".")
    return ".".join(parts[:2])


def modules(root):
    """``{module name: path}`` of every .py file under ``root`` (a ``sevcore`` directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module, node):
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if not node.level:
        return node.module
    base = module.split(".")[:-node.level]
    return ".".join(base + ([node.module] if node.module else []))


class _Scan(ast.NodeVisitor):
    """Collects the imports of one module (with whether each is function-local) and the private
    attribute names it reads on objects other than ``self``/``cls``."""

    def __init__(self, module, mods):
        self.module, self.mods = module, mods
        self.imports = []            # (target module, lineno, local, private names)
        self.aliases = {}            # local name -> module it is bound to
        self.private_reads = []      # (name, lineno, base alias or None)
        self.defined = set()         # private names this module defines
        self.depth = 0

    def _target(self, name):
        """The sevcore module ``name`` names, or its package when ``name`` is an attribute."""
        while name and name not in self.mods:
            name = name.rpartition(".")[0]
        return name or None

    def visit_FunctionDef(self, node):
        if node.name.startswith("_"):
            self.defined.add(node.name)
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        if node.name.startswith("_"):
            self.defined.add(node.name)
        self.generic_visit(node)

    def visit_Import(self, node):
        for a in node.names:
            if a.name.startswith("sevcore"):
                t = self._target(a.name)
                if t:
                    self.imports.append((t, node.lineno, self.depth > 0, ()))
                    self.aliases[a.asname or a.name.split(".")[0]] = \
                        a.name if a.asname else "sevcore"

    def visit_ImportFrom(self, node):
        base = _resolve(self.module, node)
        if not base or not base.startswith("sevcore"):
            return
        for a in node.names:
            sub = f"{base}.{a.name}"
            if sub in self.mods:              # from pkg import module
                self.imports.append((sub, node.lineno, self.depth > 0, ()))
                self.aliases[a.asname or a.name] = sub
            else:
                t = self._target(base)
                if t:
                    private = (a.name,) if a.name.startswith("_") else ()
                    self.imports.append((t, node.lineno, self.depth > 0, private))

    def visit_Attribute(self, node):
        name = node.attr
        if name.startswith("_") and not name.startswith("__"):
            base = node.value
            if isinstance(node.ctx, ast.Store):
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    self.defined.add(name)
            elif not (isinstance(base, ast.Name) and base.id in ("self", "cls")):
                alias = self.aliases.get(base.id) if isinstance(base, ast.Name) else None
                self.private_reads.append((name, node.lineno, alias))
        self.generic_visit(node)

    def visit_Assign(self, node):
        for t in node.targets:
            if isinstance(t, ast.Name) and t.id.startswith("_"):
                self.defined.add(t.id)
            if isinstance(t, ast.Name) and t.id == "__slots__" and \
                    isinstance(node.value, (ast.Tuple, ast.List)):
                self.defined.update(e.value for e in node.value.elts
                                    if isinstance(e, ast.Constant) and isinstance(e.value, str))
        self.generic_visit(node)


def _commented(lines, lineno):
    """A function-local import explains itself: a comment on its line or the line above."""
    here = lines[lineno - 1]
    above = lines[lineno - 2].strip() if lineno >= 2 else ""
    return "#" in here or above.startswith("#")


def check(root):
    """Every layering violation under ``root`` as a sorted list of ``"module:line: what"``."""
    mods = modules(root)
    scans = {}
    for name, path in mods.items():
        s = _Scan(name, mods)
        s.visit(ast.parse(path.read_text(), str(path)))
        scans[name] = s
    compat = _compat_names(root)
    defined_in = {}
    for name, s in scans.items():
        for d in s.defined:
            defined_in.setdefault(package_of(name), set()).add(d)
    problems = []
    graph = {m: set() for m in mods}
    for name, s in scans.items():
        lines = mods[name].read_text().splitlines()
        me = layer_of(name)
        pkg = package_of(name)
        for target, lineno, local, private in s.imports:
            if target == name:
                continue
            graph[name].add(target)
            if name in compat or target == "sevcore":
                continue
            them = layer_of(target)
            if me is not None and them is not None and them > me:
                problems.append(f"{name}:{lineno}: imports {target} from a higher layer "
                                f"({LAYERS[them][0]} above {LAYERS[me][0]})")
            if target in compat:
                problems.append(f"{name}:{lineno}: imports {target}, an old name kept for users")
            if private and package_of(target) != pkg:
                problems.append(f"{name}:{lineno}: imports private {private[0]} from {target}")
            if local and not _commented(lines, lineno):
                problems.append(f"{name}:{lineno}: function-local import of {target} without a "
                                f"comment saying why")
        mine = defined_in.get(pkg, set())
        for attr, lineno, alias in s.private_reads:
            if alias is not None and alias in mods and package_of(alias) != pkg:
                problems.append(f"{name}:{lineno}: reads private {attr} of {alias}")
            elif alias is None and attr not in mine:
                owners = sorted(p for p, d in defined_in.items() if attr in d)
                if owners:
                    problems.append(f"{name}:{lineno}: reads private {attr} of an object of "
                                    f"{', '.join(owners)}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return sorted(problems)


def _compat_names(root):
    """The old module names kept as re-exports (sevcore._compat.MOVED), which sit outside the
    layers: they only forward to the new module."""
    path = root / "_compat.py"
    if not path.exists():
        return set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "MOVED" for t in node.targets):
            return {f"sevcore.{k.value}" for k in node.value.keys}
    return set()


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan), each as a list."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_keeps_its_layers():
    """No upward import, cycle, cross-package private name or unexplained local import."""
    assert check(ROOT) == []


PLANTS = [
    ("sevcore/core/bitmap.py", "from sevcore.kvm import vm\n", "from a higher layer"),
    ("sevcore/psp/status.py", "from sevcore.core.npt import _range\n", "imports private _range"),
    ("sevcore/hw/umc.py", "def f():\n    from sevcore.core import npt\n",
     "without a comment"),
    ("sevcore/kvm/caps.py", "def f(psp):\n    return psp._write\n", "reads private _write"),
    ("sevcore/_bindings.py", "from sevcore.core import npt\n", "import cycle"),
    ("sevcore/kvm/vm.py", "from sevcore import memcrypt\n", "an old name kept for users"),
]


@pytest.mark.parametrize("path,code,message", PLANTS)
def test_a_planted_violation_is_found(tmp_path, path, code, message):
    """Each kind of violation, planted in a copy of the package, is reported."""
    copy = tmp_path / "sevcore"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    target = tmp_path / path
    target.write_text(target.read_text() + "\n" + textwrap.dedent(code))
    found = check(copy)
    assert any(message in p for p in found), found


@pytest.mark.parametrize("leaf,forbidden", [
    ("sevcore.core.bitmap", ("sevcore.psp", "sevcore.kvm", "sevcore.migration", "sevcore.hw",
                             "Crypto")),
    ("sevcore.uapi", ("sevcore._bindings", "sevcore.core", "sevcore.psp", "sevcore.kvm")),
    ("sevcore.core.memcrypt", ("sevcore.psp", "sevcore.kvm", "sevcore.migration", "Crypto")),
    ("sevcore.psp", ("sevcore.kvm", "sevcore.migration", "sevcore.host")),
])
def test_importing_a_leaf_loads_no_model_above_it(leaf, forbidden):
    """Importing a low-layer module does not load the layers above it (nor pycryptodome)."""
    code = f"import sys, {leaf}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONWARNINGS": "error"}).stdout
    loaded = [m for m in out.split() if m.startswith(forbidden)]
    assert loaded == [], loaded


@pytest.mark.parametrize("old", sorted(
    __import__("sevcore._compat", fromlist=["MOVED"]).MOVED))
def test_an_old_module_name_is_the_new_module(old):
    """``sevcore.<old>`` (a name the README once documented) is the moved module itself."""
    import importlib
    import warnings
    from sevcore._compat import MOVED
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.modules.pop(f"sevcore.{old}", None)
        mod = importlib.import_module(f"sevcore.{old}")
    assert mod is importlib.import_module(f"sevcore.{MOVED[old]}")
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
