"""`hpc-uc info`: what is installed, which backends run, and where this rank stands."""
from __future__ import annotations

import importlib
import platform

from .comm import get_comm, horovod_available, launched_by_mpi, torch_distributed_available


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # an optional package: report, don't fail
        return f"not available ({type(exc).__name__})"


def _mpi_library() -> str:
    try:
        import mpi4py

        mpi4py.rc.initialize = launched_by_mpi()  # the version needs no MPI_Init
        from mpi4py import MPI
    except ImportError:
        return "mpi4py not installed"
    return MPI.Get_library_version().split(",")[0].strip()


def info_lines(backend: str = "auto") -> list[str]:
    """Lines describing the installation and this rank (rank 0 prints them)."""
    import torch

    hvd_ok, dist_ok = horovod_available(), torch_distributed_available()
    comm = get_comm(backend)
    ranks = comm.gather(f"rank {comm.rank}: host {platform.node()}, local rank {comm.local_rank}, "
                        f"device {comm.device}, threads {torch.get_num_threads()}")
    if not comm.is_root:
        return []
    gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "none"
    lines = [
        f"hpc-uc {_version('hpc_uc')} on Python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__}, torchvision {_version('torchvision')}, GPUs: {gpu}",
        f"horovod {_version('horovod')}, mpi4py {_version('mpi4py')} ({_mpi_library()})",
        f"h5py {_version('h5py')}, medmnist {_version('medmnist')}, numpy {_version('numpy')}",
        "backends:",
        f"  horovod: {'available' if hvd_ok else 'not available (make install HOROVOD=1)'}",
        f"  torch.distributed: {'available' if dist_ok else 'not available'}"
        f" ({'nccl' if torch.cuda.is_available() else 'gloo'} here)",
        f"backend in use: {comm.backend}",
        f"world size: {comm.size}",
        *ranks,
    ]
    return lines
