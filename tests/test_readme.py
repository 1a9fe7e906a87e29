"""Every ```python block in README.md and docs/*.md runs as written (the docs are the public API's contract)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCKS = [(p.relative_to(ROOT).as_posix(), i, code) for p in DOCS
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S))]


def test_docs_have_examples():
    readme = [b for b in BLOCKS if b[0] == "README.md"]
    assert len(readme) >= 5, "README lost its runnable API examples"
    assert len(BLOCKS) >= 25, "docs lost their runnable examples"


@pytest.mark.parametrize("name,index,code", BLOCKS, ids=[f"{n}[{i}]" for n, i, _ in BLOCKS])
def test_doc_block_runs(name, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{name}[python block {index}]", "exec"), {"__name__": f"doc_block_{index}"})
