"""Atomic file writes: write to a temporary name in the same directory, then rename."""
from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

OWNER_ONLY = 0o600  # secrets: whatever can reproduce a perturbation (docs/bad_input.md)


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if mode is not None:  # created with its mode: a secret is never readable, even half-written
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode))
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_torch(path: str | Path, obj: Any, mode: int | None = None) -> None:
    """torch.save atomically (tensors and plain containers only, so weights_only loads it)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue(), mode)


def owner_only_dir(path: str | Path) -> Path:
    """A directory only its owner can enter (for secrets)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def load_torch(path: str | Path) -> Any:
    """Load a file written by :func:`save_torch` without unpickling arbitrary objects."""
    import pickle
    import zipfile

    import torch

    from .errors import UserError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is damaged or not a file hpc-uc wrote ({type(exc).__name__}); delete it "
                        f"and run the stage that makes it again") from None


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (rank 0's metrics log)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
