"""Single-process communicator behaviour and whole-job failure handling under mpirun."""
from __future__ import annotations

import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import torch

from conftest import mpirun, run_job, venv_bin
from hpc_uc.comm import get_comm


def test_size_one_calls_work_locally():
    comm = get_comm("mpi")
    assert (comm.rank, comm.size, comm.is_root, comm.device.type) == (0, 1, True, "cpu")
    x = torch.arange(3.0)
    assert torch.equal(comm.allreduce(x, op="sum"), x)
    assert comm.broadcast({"a": 1}) == {"a": 1}
    assert comm.gather(np.ones(2))[0].tolist() == [1.0, 1.0]
    model = torch.nn.Linear(2, 1)
    opt = comm.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    comm.barrier()


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend"):
        get_comm("nccl-please")


def test_allreduce_rejects_unknown_op():
    with pytest.raises(ValueError, match="op must be"):
        get_comm("mpi").allreduce(torch.ones(1), op="max")


@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_exception_on_one_rank_ends_the_job(tmp_path, backend):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from hpc_uc.comm import get_comm
        comm = get_comm("{backend}")
        if comm.rank == 1:
            raise RuntimeError("boom on rank one")
        comm.barrier()   # rank 0 would wait here forever without the abort
        time.sleep(60)
    """))
    start = time.monotonic()
    proc = run_job([*mpirun(2), sys.executable, str(script)], timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 30, f"job took {elapsed:.1f}s to end"
    # one line from the failing rank (mpirun may glue its own banner onto the same line)
    assert proc.stderr.count("hpc-uc: error") == 1
    assert "hpc-uc: error on rank 1/2: RuntimeError: boom on rank one" in proc.stderr


def test_info_without_mpirun():
    out = run_job([venv_bin("hpc-uc"), "info"], timeout=300)
    assert out.returncode == 0, out.stderr
    assert "world size: 1" in out.stdout


def test_info_under_mpirun_shows_both_backends():
    out = run_job([*mpirun(2), venv_bin("hpc-uc"), "info"], timeout=300)
    assert out.returncode == 0, out.stderr
    assert "world size: 2" in out.stdout
    assert "torch.distributed: available" in out.stdout
    from hpc_uc.comm import horovod_available
    if horovod_available():
        assert "horovod: available" in out.stdout


def test_hung_job_is_killed_with_all_its_ranks(tmp_path):
    """The suite's guard: a job that outlives its timeout fails the test and leaves no rank."""
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        open(os.path.join({str(tmp_path)!r}, f"alive{{os.getpid()}}"), "w").close()
        time.sleep(120)
    """))
    with pytest.raises(pytest.fail.Exception, match="still running after 5s"):
        run_job([*mpirun(2), sys.executable, str(script)], timeout=5)
    pids = [int(p.name[len("alive"):]) for p in tmp_path.glob("alive*")]
    assert len(pids) == 2
    time.sleep(0.5)
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_every_allreduce_call_site_has_a_stable_name():
    """Horovod caches the negotiation of a collective by tensor name; an unnamed call gets a
    new name each time and fills the cache ("A response has been evicted from cache")."""
    import ast

    from conftest import REPO

    unnamed = []
    for path in sorted((REPO / "hpc_uc").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "allreduce"
                    and not any(k.arg == "name" for k in node.keywords)):
                unnamed.append(f"{path.name}:{node.lineno}")
    assert not unnamed, unnamed


def test_horovod_allreduce_passes_the_name():
    import torch

    from hpc_uc.comm import HorovodComm

    calls = []
    fake = type("hvd", (), {"Average": "avg", "Sum": "sum",
                            "allreduce": staticmethod(lambda t, op, name: calls.append((op, name)) or t)})
    comm = HorovodComm.__new__(HorovodComm)
    comm.hvd = fake
    comm.allreduce(torch.ones(2), op="sum", name="generator.loss")
    assert calls == [("sum", "generator.loss")]


def test_local_comm_is_one_rank_and_every_collective_is_the_identity():
    import numpy as np
    import torch

    from hpc_uc.comm import Comm

    solo = Comm.local()
    assert (solo.rank, solo.size, solo.is_root, str(solo.device)) == (0, 1, True, "cpu")
    t = torch.arange(3.0)
    assert torch.equal(solo.allreduce(t, op="sum", name="x"), t) and solo.broadcast("v") == "v"
    assert solo.gather(5) == [5] and solo.allgather(5) == [5]
    (rows,), index = solo.gather_rows([np.array([[2.0], [1.0]])], np.array([9, 3]))
    assert index.tolist() == [3, 9] and rows[:, 0].tolist() == [1.0, 2.0]
    solo.barrier()
