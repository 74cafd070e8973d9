"""Every Python code block in README.md and docs/ runs, in order, one namespace per page.

A block that cannot run on its own is preceded by ``<!-- docs-test: skip: <reason> -->``; one that talks to a
server by ``<!-- docs-test: server <model name> -->``: the test serves a small language model under that name on
free ports and points the block's ``127.0.0.1:8000`` (HTTP) and ``127.0.0.1:8001`` (gRPC) at them. Pages run in
a fresh folder holding ``runs/lm.pt`` (a small character language model) and ``lm.onnx`` (its export).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .serve_subprocess import serving

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_PAGES = [page for page in PAGES if "```python" in page.read_text()]
BLOCK = re.compile(r"(?:<!-- docs-test: (?P<marker>[^>]*?) -->\n)?^```python\n(?P<code>.*?)^```", re.M | re.S)
VOCAB = [chr(c) for c in range(32, 127)]


def blocks(page: Path) -> list[tuple[int, str, str]]:
    """``(line, marker, code)`` of each Python block of ``page``; ``marker`` is ``""`` when there is none."""
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start("code")) + 1, (m.group("marker") or "").strip(), m.group("code"))
        for m in BLOCK.finditer(text)
    ]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    import rnndeploy
    from rnndeploy.export import export_checkpoint

    folder = tmp_path_factory.mktemp("docs-fixtures")
    (folder / "runs").mkdir()
    config = rnndeploy.ModelConfig(
        task="lm", cell="lstm", vocab_size=len(VOCAB), hidden_size=32, embed_dim=16
    )
    rnndeploy.save_checkpoint(folder / "runs" / "lm.pt", rnndeploy.SequenceModel(config), vocab=VOCAB)
    export_checkpoint(folder / "runs" / "lm.pt", folder / "lm.onnx")
    return folder


@pytest.mark.parametrize("page", CODE_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(page: Path, fixtures: Path, tmp_path, monkeypatch):
    found = blocks(page)
    shutil.copytree(fixtures, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for line, marker, code in found:
        where = f"{page.relative_to(ROOT)}:{line}"
        if marker.startswith("skip"):
            assert marker.partition(":")[2].strip(), f"{where}: a skipped block must say why"
            continue
        if marker.startswith("server"):
            name = marker.split()[1]
            with serving(tmp_path / "lm.onnx", name=name, grpc=True) as served:
                http_port, grpc_port = served.http_port, served.grpc_port
                code = code.replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
                code = code.replace("127.0.0.1:8001", f"127.0.0.1:{grpc_port}")
                exec(compile(code, where, "exec"), namespace)
        else:
            assert not marker, f"{where}: unknown docs-test marker {marker!r}"
            exec(compile(code, where, "exec"), namespace)
        ran += 1
    assert ran, f"{page.relative_to(ROOT)}: every Python block is skipped"


def test_readme_headline_table_matches_the_results_file():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_readme.py"), "--check"], cwd=ROOT)
    assert result.returncode == 0, "README.md's headline table is stale: run python docs/gen_readme.py"
