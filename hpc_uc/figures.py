"""Matplotlib without a display, and figures written atomically as PNG."""
from __future__ import annotations

import io
from pathlib import Path

from .atomic import write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed on a compute node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` (atomically) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    write_bytes(path, buf.getvalue())
