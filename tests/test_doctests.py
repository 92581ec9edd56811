"""Every example a reader sees is executed here, so none can rot.

* The docstring examples (``>>>``) of every public module run as doctests, one
  test per module, with ``ELLIPSIS | NORMALIZE_WHITESPACE``. A public module is
  any module of ``soapbubble`` whose dotted name has no ``_``-prefixed part; a
  module added later is picked up without editing this file. A docstring with an
  ``Example:`` / ``Examples:`` section must hold at least one ``>>>`` example.
* The README's ```` ```python ```` blocks run in order in one namespace, in a
  subprocess with ``SOAPBUBBLE_CACHE`` and the working directory in a temporary
  folder (the first block trains the default model: ~10-20 s on two cores).
* Each guide in ``docs/guides/`` runs the same way. There, a ```` ```text ````
  block right after a ```` ```python ```` block is that block's printed output,
  and must match what it prints (same option flags as the doctests), so the
  numbers a guide states are the numbers the code computes.

Examples that write files use ``tempfile`` or the working directory (a temporary
folder here); nothing is written into the repository or the user's cache.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest


from conftest import public_modules

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


MODULES = public_modules()


# ----------------------------------------------------------------------------- docstrings

_EXAMPLE_SECTION = re.compile(r"^\s*Examples?:\s*$", re.MULTILINE)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One table cache for all modules' doctests (tables built once), never the user's."""
    return tmp_path_factory.mktemp("soapbubble-cache")


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOAPBUBBLE_CACHE", str(cache_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)  # a stray relative path lands here, not in the repository
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=False)
    tests = [t for t in finder.find(module, name) if t.docstring]
    empty = [t.name for t in tests if _EXAMPLE_SECTION.search(t.docstring) and not t.examples]
    assert not empty, f"'Example:' sections without a >>> example (nothing runs): {empty}"

    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    start = time.perf_counter()
    for test in tests:
        if test.examples:
            runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
    print(f"{name}: {result.attempted} examples, {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------- markdown snippets

_FENCE = re.compile(r"^(`{3,})\s*(\S*)")  # the info string's first word: python, text, {code-block}, ...


def markdown_blocks(path: pathlib.Path) -> list[dict]:
    """Fenced blocks of a markdown file: ``{"lang", "line", "code", "want"}`` for each python block.

    ``line`` is the 1-based line of the block's first code line (tracebacks point
    into the markdown file); ``want`` is the text of a ```` ```text ```` block that
    follows the python block with nothing but blank lines between, else None.
    """
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not re.match(rf"^{fence}\s*$", lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unclosed code fence")
        blocks.append({"lang": lang, "line": i + 2, "code": "\n".join(lines[i + 1 : j]) + "\n",
                       "end": j + 1})
        i = j + 1
    out = []
    for k, block in enumerate(blocks):
        if block["lang"] != "python":
            continue
        want = None
        nxt = blocks[k + 1] if k + 1 < len(blocks) else None
        if nxt and nxt["lang"] == "text":
            between = lines[block["end"] : nxt["line"] - 2]
            if all(not s.strip() for s in between):
                want = nxt["code"]
        out.append({"line": block["line"], "code": block["code"], "want": want})
    return out


# Runs the blocks of one file in order in one namespace, checking each block's output.
_RUNNER = r"""
import contextlib, doctest, io, json, sys, time
spec = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
checker = doctest.OutputChecker()
for block in spec["blocks"]:
    source = "\n" * (block["line"] - 1) + block["code"]  # line numbers of the markdown file
    code = compile(source, spec["path"], "exec")
    out = io.StringIO()
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(out):
        exec(code, namespace)
    got = out.getvalue()
    sys.stdout.write(got)
    print(f"[{spec['path']}:{block['line']}: {time.perf_counter() - start:.1f} s, "
          f"cpu {time.process_time() - cpu:.1f} s]", file=sys.stderr)
    want = block["want"]
    if want is not None and not checker.check_output(want, got, spec["flags"]):
        sys.exit(f"{spec['path']}:{block['line']}: the block's output differs from the text block "
                 f"after it.\n--- expected\n{want}--- got\n{got}")
"""


def run_markdown(path: pathlib.Path, tmp_path: pathlib.Path, timeout: float) -> tuple[float, str]:
    blocks = markdown_blocks(path)
    assert blocks, f"{path} has no python block"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"path": str(path), "blocks": blocks, "flags": FLAGS}))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "SOAPBUBBLE_CACHE": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(spec)], check=False, cwd=work,
                          env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return elapsed, proc.stderr


def test_readme_python_blocks(tmp_path):
    elapsed, log = run_markdown(README, tmp_path, timeout=600)
    print(f"README.md: {elapsed:.1f} s\n{log}")


def test_guides_exist():
    names = {p.stem for p in GUIDES}
    assert {"from_cohen", "pixel_space", "choosing_n", "choosing_family"} <= names, names


@pytest.mark.parametrize("guide", GUIDES, ids=[p.stem for p in GUIDES])
def test_guide_python_blocks(guide, tmp_path):
    elapsed, log = run_markdown(guide, tmp_path, timeout=300)
    print(f"{guide.name}: {elapsed:.1f} s\n{log}")


def test_markdown_blocks_parser(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text\n\n```python\nprint(1)\n```\n\n```text\n1\n```\n\n```bash\nls\n```\n"
                  "```python\nx = 2\n```\nprose\n```text\nnot output\n```\n")
    blocks = markdown_blocks(md)
    assert blocks == [{"line": 4, "code": "print(1)\n", "want": "1\n"},
                      {"line": 15, "code": "x = 2\n", "want": None}]
