"""rnndeploy.server's modules import one another without a circle, and the data plane knows no transport."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rnndeploy.server

PACKAGE = Path(rnndeploy.server.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
TRANSPORTS = {"starlette", "uvicorn", "grpc", "httptools", "uvloop", "rnndeploy.server.rest",
              "rnndeploy.server.grpc_service", "rnndeploy.server.serving"}  # fmt: skip
DATA_PLANE = ("core", "batcher", "protocol", "repository", "metrics")


def imports(module: str) -> set[str]:
    """Every module ``module`` imports, at the top or inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
    return found


def server_imports(module: str) -> set[str]:
    return {name.rsplit(".", 1)[1] for name in imports(module) if name.startswith("rnndeploy.server.")}


def test_no_import_circle():
    graph = {m: server_imports(m) for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        if module not in done:
            for imported in graph[module]:
                visit(imported, (*path, module))
            done.add(module)

    for module in MODULES:
        visit(module, ())


def test_the_data_plane_knows_no_transport():
    for module in DATA_PLANE:
        top = {name.split(".")[0] for name in imports(module)}
        assert not (imports(module) | top) & TRANSPORTS, module


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_on_its_own(module):
    code = f"import rnndeploy.server.{module}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
