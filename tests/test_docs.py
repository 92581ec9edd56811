"""The documentation builds, with warnings as errors, and documents every public name.

``sphinx-build -W --keep-going -b html docs <tmp>`` must succeed: a docstring that is
not valid reStructuredText / Google style, a broken cross-reference between pages, or
a page left out of the table of contents fails here. Sphinx, myst-parser and furo
come with the ``docs`` extra, which ``.ci/run`` installs; without them these tests
fail (they are never skipped).

Then every name of every public module's ``__all__`` (a public module: any module of
``soapbubble`` whose dotted name has no ``_``-prefixed part) must be in the built
reference: the module itself as ``py:module`` in ``objects.inv``, each name as
``module.name`` with an anchor that exists in the HTML page it points to. A name a
package re-exports points at the page of the module that defines it.

The code in the guides and the README is executed by ``tests/test_doctests.py``.
"""

from __future__ import annotations

import html.parser
import importlib
import inspect
import pathlib
import subprocess
import sys
import time
import zlib

import pytest


from conftest import public_modules

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("html")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    print(f"sphinx-build: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, (
        f"sphinx-build -W failed (exit {proc.returncode}); install the docs extra: "
        f"pip install -e '.[docs]'\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return out


def read_inventory(path: pathlib.Path) -> dict[str, tuple[str, str]]:
    """``{name: (role, uri)}`` from a Sphinx ``objects.inv`` (version 2)."""
    raw = path.read_bytes()
    header = raw.split(b"\n", 4)
    assert header[0] == b"# Sphinx inventory version 2", header[0]
    entries = {}
    for line in zlib.decompress(header[4]).decode().splitlines():
        name, role, _prio, uri, _disp = line.split(" ", 4)
        if uri.endswith("$"):
            uri = uri[:-1] + name
        entries.setdefault(name, (role, uri))
    return entries


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key == "id" and value:
                self.ids.add(value)


def test_docs_build(built):
    for page in ("index.html", "overview.html", "reference.html", "notebooks.html",
                 "benchmarks.html", "guides/from_cohen.html", "guides/pixel_space.html",
                 "guides/choosing_n.html", "guides/sequential.html",
                 "guides/choosing_family.html"):
        assert (built / page).is_file(), page
    index = (built / "index.html").read_text()
    for link in ("overview.html", "reference.html", "guides/from_cohen.html", "notebooks.html"):
        assert link in index, link


def test_every_public_name_is_in_the_reference(built):
    inventory = read_inventory(built / "objects.inv")
    ids: dict[str, set[str]] = {}

    def anchor_exists(uri: str) -> bool:
        page, _, anchor = uri.partition("#")
        if page not in ids:
            parser = _Ids()
            parser.feed((built / page).read_text())
            ids[page] = parser.ids
        return not anchor or anchor in ids[page]

    missing, dangling, checked = [], [], 0
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        wanted = [(module_name, "py:module")]
        for name in getattr(module, "__all__", None) or ():
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                wanted.append((obj.__name__, "py:module"))
            else:
                wanted.append((f"{module_name}.{name}", None))
        for full, role in wanted:
            checked += 1
            entry = inventory.get(full)
            if entry is None or (role and entry[0] != role) or not entry[0].startswith("py:"):
                missing.append(full)
            elif not anchor_exists(entry[1]):
                dangling.append(f"{full} -> {entry[1]}")
    assert not missing, f"public names missing from the API reference: {missing}"
    assert not dangling, f"reference entries whose anchor is not in the page: {dangling}"
    assert checked > 200, checked


def test_reexports_link_to_their_definition(built):
    inventory = read_inventory(built / "objects.inv")
    assert inventory["soapbubble.certify"][1] == inventory["soapbubble.protocol.certify"][1]
    assert inventory["soapbubble.RadiusTable"][1] == inventory["soapbubble.bounds.table.RadiusTable"][1]
    page = (built / "api" / "soapbubble.html").read_text()
    assert "soapbubble.protocol.html#soapbubble.protocol.certify" in page
