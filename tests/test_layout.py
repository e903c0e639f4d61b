"""The package layout: imports point one way, the limits are written once, the spec is passed down.

The import graph is read from the source (every ``import``, including the
ones inside functions, which is where circles used to hide) and checked
against the rooms' ranks: a module may import its own room or a room of lower
rank, never a higher one, and the module graph has no cycle.
"""

from __future__ import annotations

import ast
import math
import os
from typing import Dict, List, Set

import pytest
import torch
import torch.nn as nn

import mixquant
from mixquant import _core
from mixquant.core import limits
from mixquant.core.spec import QuantizerSpec

PKG_DIR = os.path.dirname(mixquant.__file__)

# Room (longest module-name prefix) -> rank. A module may import only its own
# room or rooms of strictly lower rank.
RANKS = {
    "mixquant._core": 0,
    "mixquant.core": 1,
    "mixquant.io.files": 1,
    "mixquant.io.models": 1,
    "mixquant.io.strict_json": 1,
    "mixquant.io.checkpoint": 1,
    "mixquant.parallel": 1,  # torch.distributed set-up and collectives: nothing of mixquant
    "mixquant.nn": 2,
    "mixquant.allocation": 3,
    "mixquant.methods": 3,
    "mixquant.api": 4,
    "mixquant.io.export": 5,
    "mixquant.io.onnx_export": 5.5,  # reads export's codes check
    "mixquant": 6,  # the package's __init__: the public API, for the studies and the CLI to use
    "mixquant.zoo": 7,
    "mixquant.experiments": 8,
    "mixquant.cli": 9,
    "mixquant.__main__": 10,
}


def _modules() -> Dict[str, str]:
    """Module name -> source path of every .py file in the package."""
    out = {}
    for root, _, files in os.walk(PKG_DIR):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG_DIR))[:-3].replace(os.sep, ".")
            name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            out[name] = os.path.join(root, f)
    return out


MODULES = _modules()
NATIVE = {"mixquant._core"}


def _resolve(name: str) -> str:
    """The module a dotted name refers to (``mixquant.core.kernels.pack_bits`` -> ``mixquant.core.kernels``)."""
    while name not in MODULES and name not in NATIVE and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: str) -> Set[str]:
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    is_pkg = path.endswith("__init__.py")
    package = module if is_pkg else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mixquant"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if prefix.split(".")[0] != "mixquant":
                continue
            for alias in node.names:  # "from .core import kernels" names a module
                sub = f"{prefix}.{alias.name}"
                found.add(sub if sub in MODULES or sub in NATIVE else prefix)
    return {_resolve(n) for n in found} - {module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _room(module: str) -> str:
    best = max((r for r in RANKS if module == r or module.startswith(r + ".")), key=len, default=None)
    assert best is not None, f"{module} is in no room of the layout; add it to RANKS"
    return best


def test_every_module_is_in_a_room():
    for module in MODULES:
        _room(module)


def test_imports_point_down():
    bad = []
    for module, targets in GRAPH.items():
        src = _room(module)
        for target in targets:
            dst = _room(target)
            if dst != src and RANKS[dst] >= RANKS[src]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layout's direction:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    # Package __init__ files are nodes too: "from . import x" inside a room is an edge to its package.
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t in GRAPH and not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if not state.get(m):
            visit(m)


def test_the_graph_reader_sees_function_level_imports(tmp_path):
    # The checks above are only as good as the reader: a lazy import inside a function counts.
    src = tmp_path / "probe.py"
    src.write_text("def f():\n    from ..cli import main\n    import mixquant.zoo.models\n")
    assert _imports("mixquant.core.probe", str(src)) == {"mixquant.cli", "mixquant.zoo.models"}


def test_core_imports_no_other_room():
    for module, targets in GRAPH.items():
        if _room(module) == "mixquant.core":
            assert all(_room(t) in ("mixquant.core", "mixquant._core") for t in targets), (module, targets)


def test_limits_equal_the_native_checks():
    native = _core.limits()
    assert native == {
        "min_bits": limits.MIN_BITS, "max_bits": limits.MAX_BITS,
        "min_act_bits": limits.MIN_ACT_BITS, "max_act_bits": limits.MAX_ACT_BITS,
        "max_n_grid": limits.MAX_N_GRID, "max_clip_scratch_bytes": limits.MAX_CLIP_SCRATCH_BYTES,
    }


GRIDS = [(80, 0.01), (80, 0.0126), (80, 0.0127), (101, 0.01), (100, 0.01), (1, 0.999), (1, 5.0), (2, 0.999),
         (2, 1.0), (limits.MAX_N_GRID, 1e-6), (limits.MAX_N_GRID + 1, 1e-6), (3, 0.0), (3, -0.1),
         (3, math.inf), (3, math.nan), (0, 0.01)]


@pytest.mark.parametrize("n_grid,step", GRIDS)
def test_clip_grid_rule_is_the_same_everywhere(n_grid, step):
    ok = limits.clip_grid_ok(n_grid, step)
    assert _core.clip_grid_ok(n_grid, step) == ok
    w = torch.linspace(-1, 1, 24).reshape(3, 8)
    for backend in ("native", "reference"):
        if ok:
            mixquant.clip_search(w, [4], n_grid=n_grid, step=step, backend=backend)
        else:
            with pytest.raises(ValueError, match="n_grid|step"):
                mixquant.clip_search(w, [4], n_grid=n_grid, step=step, backend=backend)


def test_grid_accepted_by_python_was_refused_natively_before():
    # The case that disagreed: the last ratio 1 - 79 * 0.0126 = 0.0046 is positive.
    assert limits.clip_grid_ok(80, 0.0126) and 1 - 79 * 0.0126 > 0
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    a = mixquant.clip_search(w, [3], n_grid=80, step=0.0126, backend="native")
    b = mixquant.clip_search(w, [3], n_grid=80, step=0.0126, backend="reference")
    assert torch.equal(a.best_index, b.best_index)


def test_spec_validates_its_fields():
    for bad in ({"clip": "max"}, {"p": 0.0}, {"p": math.inf}, {"n_grid": 0}, {"n_grid": 2.0},
                {"step": 0.02, "n_grid": 80}, {"p": True}):
        with pytest.raises(ValueError):
            QuantizerSpec(**bad)
    with pytest.raises(TypeError):
        QuantizerSpec(per_channel="yes")
    assert QuantizerSpec().replace(clip="mse", p=4).p == 4.0


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_quantize_applies_the_configs_p():
    # A config searched with clip="mse", p=4 must be applied with p=4 (it used to be applied with p=2).
    model = _net()
    config = mixquant.search(model, avg_bits=3.0, clip="mse", p=4.0)
    assert config.p == 4.0 and config.spec.p == 4.0
    q = mixquant.quantize(model, config, "asymmetric", progress=False)
    differs = False
    for name, module in mixquant.find_layers(model).items():
        bits = config.bits[name]
        want, _ = mixquant.choose_qparams(module.weight, bits, clip="mse", p=4.0)
        p2, _ = mixquant.choose_qparams(module.weight, bits, clip="mse", p=2.0)
        assert torch.equal(q.get_submodule(name).weight_scale, want), name
        differs |= not torch.equal(want, p2)
    assert differs, "the test model must tell p=4 from p=2"


def test_asymmetric_options_override_the_spec_only_when_given():
    model = _net()
    config = mixquant.uniform(model, 3, clip="mse", p=4.0)
    q = mixquant.quantize(model, config, "asymmetric", progress=False, p=2.0)
    name, module = next(iter(mixquant.find_layers(model).items()))
    want, _ = mixquant.choose_qparams(module.weight, 3, clip="mse", p=2.0)
    assert torch.equal(q.get_submodule(name).weight_scale, want)
    assert q.mixquant_report["p"] == 2.0
