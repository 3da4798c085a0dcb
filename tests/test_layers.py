"""Layers import downward only: every import in ``peftjax/`` (those inside functions too) is checked.

The order, lowest first (docs/architecture.md explains each layer). A module may import from its
own layer and the layers below; a new top-level module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "peftjax"

LAYERS = [
    ("_version",),
    ("io",),  # file formats: safetensors, adapter directories, key names, Hub resolution
    ("config",),  # PEFT configs and targeting rules (``from_pretrained`` resolves Hub ids through io)
    ("nn", "quantization"),  # pure-JAX pieces models and adapters share (dropout key; quantized weights)
    ("models",),  # the bundled NNX models and their HF checkpoints
    ("tuners",),  # PEFT methods on the base tuner
    ("peft_model", "auto", "hotswap", "arrow"),  # the PeftModel API
    ("linen", "sharding"),  # Linen front end, device meshes
    ("training",),  # train step, Trainer
    ("data",),  # datasets for the CLI and examples
    ("serving",),  # the HTTP server for many adapters
    ("cli", "demo", "__init__"),  # command line, and the public surface (which re-exports the layers below)
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    """``peftjax.tuners.lora._layer`` -> ``tuners``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or path.is_dir()


def _imports(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """Every ``peftjax`` module ``source`` (the text of ``module``) imports, wherever the import is."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "peftjax"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "peftjax":
                # ``from peftjax import training`` imports the subpackage, ``from peftjax import X`` the root
                out += [f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names]
    return out


def _upward(module: str, imported: list[str]) -> list[str]:
    own = LAYER_OF[_top(module)]
    return [f"{module} -> {name}" for name in imported if LAYER_OF.get(_top(name), -1) > own]


def _unassigned(package: Path = PACKAGE) -> list[str]:
    tops = {p.relative_to(package).parts[0].removesuffix(".py") for p in package.rglob("*.py")}
    return sorted(tops - set(LAYER_OF))


def test_every_top_level_module_has_a_layer():
    missing = _unassigned()
    assert not missing, f"give these top-level modules a layer in tests/test_layers.py LAYERS: {missing}"


def test_imports_go_downward_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        upward += _upward(module, _imports(path.read_text(), module, is_package=path.name == "__init__.py"))
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(set(upward)))


def test_the_checker_flags_upward_imports_inside_functions_and_relative_ones():
    source = (
        "import numpy\n"
        "from peftjax.io import read_safetensors\n"
        "def f():\n"
        "    from peftjax.training import Trainer\n"
        "    import peftjax.cli\n"
        "    from .. import tuners\n"
        "    from peftjax import __version__\n"
    )
    imported = _imports(source, "peftjax.config._base")
    assert imported == ["peftjax.io", "peftjax.training", "peftjax.cli", "peftjax.tuners", "peftjax"]
    assert _upward("peftjax.config._base", imported) == [
        "peftjax.config._base -> peftjax.training",
        "peftjax.config._base -> peftjax.cli",
        "peftjax.config._base -> peftjax.tuners",
        "peftjax.config._base -> peftjax",
    ]


def test_a_new_top_level_module_without_a_layer_fails(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "__init__.py").write_text("")
    (tmp_path / "plugins.py").write_text("")
    assert _unassigned(tmp_path) == ["plugins"]
