"""The package's layers, enforced: only ``llama/`` imports llama_cpp; ``core/`` imports neither the engine nor
typer; ``cli/`` imports no engine module; nothing imports ``cli/``. Read from the source (``ast``), so a lazy
import inside a function counts too."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "safeinfer_local"


def _imports(path: Path) -> set[str]:
    """Absolute dotted names of every module imported by a file (relative imports resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    out.update(f"{mod}.{a.name}" for a in node.names)
                    continue
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _files(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py")) if sub else sorted(PKG.rglob("*.py"))


def _violations(files, forbidden, allowed=()) -> list[str]:
    bad = []
    for f in files:
        for name in _imports(f):
            if name in allowed:
                continue
            if any(name == p or name.startswith(p + ".") for p in forbidden):
                bad.append(f"{f.relative_to(PKG.parent)} imports {name}")
    return bad


def test_the_import_graph_is_resolved_from_source():
    # the checker itself: it sees relative, lazy and aliased imports
    names = _imports(PKG / "cli" / "__init__.py")
    assert "typer" in names and "safeinfer_local.errors" in names
    assert "llama_cpp" in _imports(PKG / "llama" / "engine.py")


def test_only_llama_imports_llama_cpp():
    files = [f for f in _files() if "llama" not in f.relative_to(PKG).parts[:1]]
    assert not _violations(files, ["llama_cpp"])


def test_core_imports_neither_engine_nor_typer():
    assert not _violations(_files("core"), ["llama_cpp", "safeinfer_local.llama", "safeinfer_local.decode",
                                            "safeinfer_local.api", "typer", "rich", "safeinfer_local.cli"])


def test_cli_imports_no_engine_module():
    # the SIGINT handler (llama/interrupts.py, which imports no llama_cpp) is the one thing the CLI takes from llama/
    allowed = ("safeinfer_local.llama", "safeinfer_local.llama.interrupts")
    assert not _violations(_files("cli"), ["llama_cpp", "safeinfer_local.llama", "safeinfer_local.decode.sides",
                                           "safeinfer_local.decode.decoder", "safeinfer_local.decode.batch"],
                           allowed)
    assert "llama_cpp" not in _imports(PKG / "llama" / "interrupts.py")


def test_nothing_below_the_cli_imports_it_or_typer():
    files = [f for f in _files() if f.relative_to(PKG).parts[0] != "cli"]
    assert not _violations(files, ["safeinfer_local.cli", "typer"])


def test_the_server_goes_through_the_api():
    # safeinfer serve reaches the model only through SafeInfer (and decode's public values: GenConfig, Step, Result),
    # never the engine or a side; it is a library the CLI calls, so it imports neither the CLI nor typer
    assert not _violations(_files("serve"), ["llama_cpp", "safeinfer_local.llama", "safeinfer_local.decode.sides",
                                             "safeinfer_local.decode.decoder", "safeinfer_local.decode.gating",
                                             "safeinfer_local.cli", "typer"])
    assert "safeinfer_local.api" in _imports(PKG / "serve" / "scheduler.py")


def test_only_the_ray_module_imports_ray():
    # Ray is an optional extra: safeinfer_local/ray.py imports it lazily, and nothing else imports it at all
    files = [f for f in _files() if f != PKG / "ray.py"]
    assert not _violations(files, ["ray"])
    assert "ray" in _imports(PKG / "ray.py")
