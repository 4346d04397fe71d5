"""The package's layering: a pure core, an evaluation layer and an application layer."""

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "mini_unlearn_jax"
LAYERS = ("core", "evaluation", "app")
# third-party packages the core must not import (argparse and orbax belong to the application)
NOT_IN_CORE = {"argparse", "orbax", "sklearn", "scipy", "matplotlib", "tensorflow", "tensorflow_datasets"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (lazy imports inside functions count)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            for a in node.names:  # `from . import linalg` imports the submodule
                if (PKG.parent / (mod.replace(".", "/") + f"/{a.name}.py")).exists():
                    out.add(f"{mod}.{a.name}")
    return out


def _graph() -> dict[str, set[str]]:
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_every_module_sits_in_a_layer():
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG)
        assert len(rel.parts) == 1 and rel.name in ("__init__.py", "__main__.py") or rel.parts[0] in LAYERS, rel


@pytest.mark.parametrize("layer, forbidden", [("core", ("evaluation", "app")), ("evaluation", ("app",))])
def test_lower_layers_do_not_import_higher_ones(layer, forbidden):
    for p in (PKG / layer).glob("*.py"):
        for mod in _imports(p):
            assert not any(mod.startswith(f"mini_unlearn_jax.{f}") for f in forbidden), f"{p.name} imports {mod}"
            if layer == "core":
                assert mod.split(".")[0] not in NOT_IN_CORE, f"core/{p.name} imports {mod}"


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            if n == "mini_unlearn_jax":  # every submodule's import runs the package __init__ first
                continue
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_import_is_light():
    """`import mini_unlearn_jax` loads JAX and its own core, not the evaluation or data stacks."""
    code = ("import sys, mini_unlearn_jax; "
            "print(' '.join(m for m in ('sklearn', 'scipy', 'matplotlib', 'tensorflow', 'tensorflow_datasets', "
            "'orbax', 'mini_unlearn_jax.evaluation.attacks', 'mini_unlearn_jax.app.cli') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"loaded at import: {proc.stdout.strip()}"


def test_public_names_resolve_to_their_modules():
    """Every name in ``__all__`` resolves (the lazy ones on first use, to the very objects of
    their modules); the layers' subpackages are reachable as attributes."""
    import mini_unlearn_jax as mu
    from mini_unlearn_jax.core import linalg, unlearning

    for name in mu.__all__:
        assert getattr(mu, name) is not None, name
    assert mu.unlearn is unlearning.unlearn and mu.fit_stats is linalg.fit_stats
    assert mu.attacks.__name__ == "mini_unlearn_jax.evaluation.attacks" and mu.load_run.__module__.endswith("checkpoint")
    with pytest.raises(AttributeError):
        mu.no_such_name  # noqa: B018
    code = "import mini_unlearn_jax as mu; print(mu.app.__name__, mu.evaluation.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["mini_unlearn_jax.app", "mini_unlearn_jax.evaluation"], proc.stderr[-2000:]
