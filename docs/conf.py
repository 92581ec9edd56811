"""Sphinx configuration for soapbubble's documentation.

Build (from the repository root, with the ``docs`` extra installed)::

    sphinx-build -W -b html docs docs/_build/html

The API reference is generated from the package itself at build time: one page
per public module (every module of ``soapbubble`` whose dotted name has no part
starting with ``_``), written to ``docs/api/`` (git-ignored). A page documents
the names of the module's ``__all__`` that are defined there (autodoc, Google
style through napoleon) and lists the names it re-exports, each linked to the
page that defines it. Re-exported names are also registered as aliases in the
Python domain, so ``soapbubble.certify`` is a valid cross-reference target and
appears in ``objects.inv``; a re-export whose definition is not documented
anywhere is a warning (an error under ``-W``). Nothing here executes notebooks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
# Importing soapbubble must not touch the user's cache (autodoc only imports; nothing here runs).
os.environ.setdefault("MPLBACKEND", "Agg")

from soapbubble._modules import public_modules

project = "soapbubble"
author = "the soapbubble authors"
copyright = "the soapbubble authors, Apache-2.0"
try:
    release = importlib.metadata.version("soapbubble")
except importlib.metadata.PackageNotFoundError:  # not installed: the source tree is on sys.path
    release = ""
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown: GitHub-style heading anchors (the README links to #certified-radii), $...$ math.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# Google-style docstrings. ``Attributes:`` become ``:ivar:`` fields, so a NamedTuple's
# fields are not described twice (napoleon's attribute entries and autodoc's members).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True

html_theme = "furo"
html_title = f"soapbubble {release}".strip()
html_static_path: list[str] = []


# ----------------------------------------------------------------------------- public modules


def _canonical(module: str, name: str, obj, modules: dict) -> str | None:
    """Where ``module.name`` is defined, if elsewhere among the public modules' ``__all__``."""
    home = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    if not home or not qual or home == module or "." in qual or home not in modules:
        return None
    if qual not in (getattr(modules[home], "__all__", None) or ()):
        return None
    return f"{home}.{qual}"


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    line = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    # ``|`` outside inline literals would start a substitution reference.
    parts = re.split(r"(``.+?``)", line)
    return "".join(p if p.startswith("``") else p.replace("|", r"\|") for p in parts)


def _kind(obj) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


def module_page(name: str, modules: dict) -> str:
    """The reStructuredText of one module's API page."""
    mod = modules[name]
    exported = list(getattr(mod, "__all__", None) or ())
    here, data, aliases, submodules = [], [], [], []
    for member in exported:
        if not hasattr(mod, member):
            from sphinx.util import logging

            logging.getLogger(__name__).warning("%s.__all__ names %r, which the module lacks", name, member)
            continue
        obj = getattr(mod, member)
        if inspect.ismodule(obj):
            submodules.append(obj.__name__)
            continue
        target = _canonical(name, member, obj, modules)
        if target is not None:
            aliases.append((member, target, _kind(obj), _summary(obj)))
        elif inspect.isclass(obj) or inspect.isroutine(obj):
            here.append(member)
        else:
            data.append(member)  # autodoc's :members: drops module data without a #: comment

    title = f"``{name}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {name}"]
    if here:
        lines.append(f"   :members: {', '.join(here)}")
    lines.append("")
    if data:
        lines += [".. rubric:: Constants", ""]
        for member in data:
            lines += [f".. autodata:: {name}.{member}", ""]
    if submodules:
        lines += [".. rubric:: Submodules", ""]
        lines += [f"* :py:mod:`{sub}`" for sub in submodules]
        lines.append("")
    if aliases:
        lines += [
            ".. rubric:: Re-exported names",
            "",
            f"These names of ``{name}.__all__`` are defined elsewhere; each links to its definition.",
            "",
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 30 10 60",
            "",
            "   * - name",
            "     - kind",
            "     - summary",
        ]
        for member, target, kind, summary in aliases:
            lines += [
                f"   * - :py:obj:`{name}.{member} <{target}>`",
                f"     - {kind}",
                f"     - {summary or ' '}",
            ]
        lines.append("")
    return "\n".join(lines)


def reexports(modules: dict) -> dict[str, str]:
    """``{"soapbubble.certify": "soapbubble.protocol.certify", ...}`` for every public module."""
    out = {}
    for name, mod in modules.items():
        for member in getattr(mod, "__all__", None) or ():
            obj = getattr(mod, member, None)
            if obj is None or inspect.ismodule(obj):
                continue
            target = _canonical(name, member, obj, modules)
            if target is not None:
                out[f"{name}.{member}"] = target
    return out


def write_api_pages(app) -> None:
    """Writes ``docs/api/<module>.rst`` for every public module (only files whose text changed)."""
    modules = {name: importlib.import_module(name) for name in public_modules()}
    api = DOCS / "api"
    api.mkdir(exist_ok=True)
    wanted = set()
    for name in modules:
        path = api / f"{name}.rst"
        wanted.add(path.name)
        text = module_page(name, modules)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    for stale in api.glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()
    app.env.soapbubble_reexports = reexports(modules)


def register_aliases(app, env) -> None:
    """Registers every re-exported name as an alias of its definition in the Python domain."""
    from sphinx.domains.python import ObjectEntry
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    domain = env.get_domain("py")
    for alias, target in sorted(getattr(app.env, "soapbubble_reexports", {}).items()):
        entry = domain.objects.get(target)
        if entry is None:
            logger.warning("%s re-exports %s, which is documented nowhere", alias, target)
            continue
        if alias in domain.objects and not domain.objects[alias].aliased:
            continue  # documented in place as well
        domain.objects[alias] = ObjectEntry(entry.docname, entry.node_id, entry.objtype, True)


# ----------------------------------------------------------------------------- autodoc hooks

_FIELD_ALIAS = re.compile(r"^Alias for field number \d+$")


def skip_member(app, what, name, obj, skip, options):
    # A module page names its members explicitly (from __all__): document each even
    # without a docstring (constants). NamedTuple field properties are described by
    # the class's ``Attributes:`` section already.
    if what == "module":
        return False
    if _FIELD_ALIAS.match((getattr(obj, "__doc__", None) or "").strip()):
        return True
    return None


def drop_type_docstring(app, what, name, obj, options, lines):
    # A constant without a doc comment would show its type's docstring (dict's, str's, ...).
    if what in ("data", "attribute") and lines:
        type_doc = inspect.getdoc(type(obj)) or ""
        if "\n".join(lines).strip() == type_doc.strip():
            lines[:] = []


# ----------------------------------------------------------------------------- included files

# Files of the repository that the docs include, and the pages they become. Links
# between them are rewritten to those pages; links to any other repository file
# become literal paths (the file is in the source tree, not in the docs).
INCLUDED = {
    "README.md": "overview.md",
    "notebooks/README.md": "notebooks.md",
    "benchmarks/RESULTS.md": "benchmarks.md",
}
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def rewrite_links(app, relative_path, parent_docname, content) -> None:
    path = pathlib.Path(relative_path)
    if not path.is_absolute():
        path = (DOCS / parent_docname).parent / path
    try:
        rel = path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return
    if rel not in INCLUDED:
        return
    base = pathlib.PurePosixPath(rel).parent

    def fix(match: re.Match) -> str:
        text, target = match.group(1), match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)  # URL or anchor in the same page
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath((base / file).as_posix())
        if resolved in INCLUDED:
            page = "/" + INCLUDED[resolved]
            return f"[{text}]({page}{'#' + anchor if anchor else ''})"
        return f"{text} (`{resolved}` in the repository)" if text != resolved else f"`{resolved}`"

    text = _LINK.sub(fix, content[0])
    if rel == "README.md":  # the page's title in the docs
        text = re.sub(r"\A# soapbubble\s*\n", "# Overview\n", text)
    content[0] = text


def setup(app):
    app.connect("builder-inited", write_api_pages)
    app.connect("env-updated", register_aliases)
    app.connect("autodoc-skip-member", skip_member)
    app.connect("autodoc-process-docstring", drop_type_docstring)
    app.connect("include-read", rewrite_links)
    return {"parallel_read_safe": False}
