"""The package's public modules: what the API docs and the docstring tests both walk."""

from __future__ import annotations

import pkgutil


def public_modules() -> list[str]:
    """Every soapbubble module whose dotted name has no ``_``-prefixed part, sorted."""
    import soapbubble

    names = ["soapbubble"]
    for info in pkgutil.walk_packages(soapbubble.__path__, "soapbubble."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)
