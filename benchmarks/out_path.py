"""Where a benchmark writes its results: the path the user names (``--out``), or by default a new
file in the system's temporary folder, never a file of the repository."""

from __future__ import annotations

import os
import tempfile
import time


def default_out(name: str, suffix: str = ".json") -> str:
    """A new, empty file in the temporary folder for benchmark ``name``'s results."""
    fd, path = tempfile.mkstemp(prefix=f"sfi-{name}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=suffix)
    os.close(fd)
    return path
