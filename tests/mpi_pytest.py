"""Run pytest on every MPI rank; rank 0 reports, other ranks stay quiet unless they fail.

Usage: mpirun -np 2 python tests/mpi_pytest.py [pytest args]
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mpi4py import MPI


def main() -> int:
    comm = MPI.COMM_WORLD
    args = ["-p", "no:cacheprovider", "--color=no", *sys.argv[1:]]
    if comm.Get_rank() == 0:
        return pytest.main(args)
    log = Path(f".pytest-rank{comm.Get_rank()}.log")
    with log.open("w") as out:
        saved = sys.stdout
        sys.stdout = out
        try:
            code = pytest.main(["-q", *args])
        finally:
            sys.stdout = saved
    if code not in (0, 5):
        print(log.read_text(), file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    rc = main()
    MPI.COMM_WORLD.Barrier()
    sys.exit(rc)
