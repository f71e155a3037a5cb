"""The communicator: the one place that knows about Horovod, torch.distributed and mpi4py.

Every stage asks a :class:`Comm` for its rank, world size, device, collectives and a
distributed optimizer. Backends:

* ``horovod`` -- horovod.torch: ring-allreduce, ``DistributedOptimizer``,
  ``broadcast_parameters``.
* ``torch``   -- torch.distributed: NCCL on GPU, Gloo on CPU. Rank 0 picks a free port on
  its own host and broadcasts the address with mpi4py (no fixed ports, no host files).
* ``auto``    -- Horovod when it imports, else torch.
* ``mpi``     -- mpi4py alone (numpy all-reduce); enough for data preparation and tools.

Without ``mpirun`` (plain ``python``) every backend is a size-1 communicator whose calls
work locally.

mpi4py always carries object/array broadcasts and gathers, whatever the training backend.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Iterable

import numpy as np
import torch

BACKENDS = ("auto", "horovod", "torch", "mpi")
GATHER_CHUNK_BYTES = 256 << 20  # per message: far below Open MPI's 2 GiB limit per rank
_CACHE: dict[str, "Comm"] = {}


# Set by MPI launchers (Open MPI/Spectrum mpirun and jsrun, MPICH/Hydra, Slurm srun, PMIx,
# MVAPICH). Without one, a plain `python` process stays a size-1 job and never initialises
# MPI (a singleton MPI_Init would leave variables behind that break a later mpirun).
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE",
                      "JSM_NAMESPACE_SIZE", "HPC_UC_MPI")


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (or HPC_UC_MPI is set)."""
    return any(os.environ.get(name) for name in LAUNCHER_VARIABLES)


def _mpi_world():
    """Return mpi4py's COMM_WORLD, or None when not under an MPI launcher or without mpi4py."""
    if not launched_by_mpi():
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def horovod_available() -> bool:
    """True when horovod.torch imports and was built with MPI or Gloo."""
    try:
        import horovod.torch as hvd
    except Exception:
        return False
    return bool(hvd.mpi_built() or hvd.gloo_built())


def torch_distributed_available() -> bool:
    """True when torch.distributed has Gloo (CPU) or NCCL (GPU)."""
    dist = torch.distributed
    return dist.is_available() and (dist.is_gloo_available() or dist.is_nccl_available())


class Comm:
    """Rank/size/device plus collectives over mpi4py; subclasses swap the tensor all-reduce."""

    backend = "mpi"

    def __init__(self) -> None:
        self.mpi = _mpi_world()
        if self.mpi is not None and self.mpi.Get_size() > 1:
            self.rank = self.mpi.Get_rank()
            self.size = self.mpi.Get_size()
            node = self.mpi.Split_type(_split_type_shared())
            self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
            node.Free()
        else:
            self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
        self.device = _pick_device(self.local_rank)
        _set_cpu_threads(self.device, self.local_size)

    @classmethod
    def local(cls, device: torch.device | None = None) -> "Comm":
        """A one-rank communicator of this process alone, even inside an MPI job (no MPI
        calls; every collective is the identity): for tools, tests and single-process use."""
        solo = cls.__new__(cls)
        solo.mpi, solo.rank, solo.size, solo.local_rank, solo.local_size = None, 0, 1, 0, 1
        solo.device = device or torch.device("cpu")
        return solo

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # ---- tensor collectives -------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, op: str = "mean", name: str | None = None) -> torch.Tensor:
        """Return the element-wise sum or mean of ``tensor`` over all ranks. ``name``: the call
        site's stable name (Horovod's response cache hits only for a name seen before)."""
        _check_op(op)
        if self.size == 1:
            return tensor.detach().clone()
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        out = np.empty_like(array)
        self.mpi.Allreduce(array, out)
        result = torch.from_numpy(out).to(tensor.device)
        return result / self.size if op == "mean" else result

    # ---- object/array collectives through mpi4py ---------------------------------------
    def broadcast(self, value: Any, root: int = 0) -> Any:
        """Broadcast a tensor, numpy array or picklable object from ``root``; returns it.

        A tensor arrives as a tensor on the caller's device (non-root ranks may pass None).
        """
        if self.size == 1:
            return value
        payload = None
        if self.rank == root:
            is_tensor = isinstance(value, torch.Tensor)
            payload = ("tensor", value.detach().cpu().numpy()) if is_tensor else ("obj", value)
        kind, data = self.mpi.bcast(payload, root=root)
        if kind == "tensor":
            device = value.device if isinstance(value, torch.Tensor) else self.device
            return torch.from_numpy(np.ascontiguousarray(data)).to(device)
        return data

    def gather(self, value: Any, root: int = 0) -> list | None:
        """Gather one value per rank to ``root`` (a list in rank order there, None elsewhere)."""
        if self.size == 1:
            return [value]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
        return self.mpi.gather(value, root=root)

    def gather_rows(self, arrays: Iterable[np.ndarray], index: np.ndarray, root: int = 0,
                    chunk_bytes: int = GATHER_CHUNK_BYTES) -> tuple[list[np.ndarray], np.ndarray] | None:
        """Every rank's rows of ``arrays`` (each N_local × ...) on ``root``, ordered by the
        global sample ``index`` (N_local), as ``(arrays, index)``; None elsewhere.

        Rows travel in rounds of at most ``chunk_bytes`` per rank, so no message nears MPI's
        2 GiB limit, whatever a rank holds. Meant for per-sample results (features,
        assignments, scores), not for images: those move through files."""
        arrays, index = [np.asarray(a) for a in arrays], np.asarray(index)
        row_bytes = index.itemsize + sum(a.itemsize * int(np.prod(a.shape[1:])) for a in arrays)
        rows = max(1, chunk_bytes // row_bytes)
        rounds = max(self.allgather(-(-len(index) // rows)))
        pieces = []
        for r in range(rounds):
            part = self.gather(([a[r * rows:(r + 1) * rows] for a in arrays], index[r * rows:(r + 1) * rows]), root)
            if self.rank == root:
                pieces += [p for p in part if len(p[1])]
        if self.rank != root:
            return None
        if not pieces:
            return arrays, index
        order = np.argsort(np.concatenate([p[1] for p in pieces]), kind="stable")
        merged = [np.concatenate([p[0][j] for p in pieces])[order] for j in range(len(arrays))]
        return merged, np.concatenate([p[1] for p in pieces])[order]

    def allgather(self, value: Any) -> list:
        """Gather one value per rank on every rank, in rank order."""
        if self.size == 1:
            return [value]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
        return self.mpi.allgather(value)

    def barrier(self) -> None:
        if self.size > 1:
            self.mpi.Barrier()

    # ---- training ------------------------------------------------------------------------
    def broadcast_model(self, model: torch.nn.Module, root: int = 0) -> None:
        """Copy ``root``'s parameters and buffers into ``model`` on every rank."""
        if self.size == 1:
            return
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if self.rank == root else None
        state = self.mpi.bcast(state, root=root)
        model.load_state_dict(state)

    def distributed_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                              backward_passes: int = 1) -> torch.optim.Optimizer:
        """Wrap ``optimizer`` so ``step()`` uses gradients averaged over all ranks
        (accumulated over ``backward_passes`` backward passes per step)."""
        return optimizer if self.size == 1 else _AllreduceOptimizer(optimizer, self)

    def abort(self, code: int = 1) -> None:
        """End the whole job now (every rank), with exit status ``code``."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size > 1:
            time.sleep(0.5)  # let mpirun forward what this rank printed before it is killed
            self.mpi.Abort(code)
        os._exit(code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend}, rank={self.rank}/{self.size}, device={self.device})"


class HorovodComm(Comm):
    """horovod.torch: ring-allreduce of tensors and gradients."""

    backend = "horovod"

    def __init__(self) -> None:
        super().__init__()
        import horovod.torch as hvd

        if self.mpi is not None and hvd.mpi_built():
            hvd.init(comm=self.mpi)
        else:
            hvd.init()
        self.hvd = hvd
        if (hvd.rank(), hvd.size()) != (self.rank, self.size):
            raise RuntimeError(f"horovod sees rank {hvd.rank()}/{hvd.size()}, MPI {self.rank}/{self.size}")

    def allreduce(self, tensor: torch.Tensor, op: str = "mean", name: str | None = None) -> torch.Tensor:
        _check_op(op)
        hvd_op = self.hvd.Average if op == "mean" else self.hvd.Sum
        return self.hvd.allreduce(tensor, op=hvd_op, name=name)

    def broadcast_model(self, model: torch.nn.Module, root: int = 0) -> None:
        if self.size > 1:
            self.hvd.broadcast_parameters(model.state_dict(), root_rank=root)

    def distributed_optimizer(self, optimizer, model, backward_passes: int = 1):
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             op=self.hvd.Average, backward_passes_per_step=backward_passes)


class TorchComm(Comm):
    """torch.distributed: NCCL on GPU, Gloo on CPU; rendezvous address sent by mpi4py."""

    backend = "torch"

    def __init__(self) -> None:
        super().__init__()
        dist = torch.distributed
        self.dist = dist
        if not dist.is_initialized():
            address = _free_address() if self.rank == 0 else None
            if self.size > 1:
                address = self.mpi.bcast(address, root=0)
            kind = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(kind, init_method=f"tcp://{address[0]}:{address[1]}",
                                    rank=self.rank, world_size=self.size)

    def allreduce(self, tensor: torch.Tensor, op: str = "mean", name: str | None = None) -> torch.Tensor:
        _check_op(op)
        out = tensor.detach().clone()
        self.dist.all_reduce(out, op=self.dist.ReduceOp.SUM)
        if op == "mean":
            out /= self.size
        return out



class _AllreduceOptimizer:
    """Averages gradients over ranks (one flat all-reduce per dtype/device) before ``step``."""

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm) -> None:
        self.optimizer = optimizer
        self.comm = comm

    def synchronize(self) -> None:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        for i, bucket in enumerate(_buckets(grads)):
            flat = self.comm.allreduce(torch.cat([g.reshape(-1) for g in bucket]), op="mean", name=f"grads.{i}")
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def step(self, closure=None):
        self.synchronize()
        return self.optimizer.step(closure)

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)


def _buckets(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def install_abort_hook(comm: "Comm") -> None:
    """Make an uncaught exception on this rank print one line and end the whole MPI job."""
    from .errors import describe

    def hook(exc_type, exc, tb):
        if not issubclass(exc_type, KeyboardInterrupt) and os.environ.get("HPC_UC_TRACEBACK"):
            sys.__excepthook__(exc_type, exc, tb)
        print(f"hpc-uc: error on rank {comm.rank}/{comm.size}: {describe(exc)}", file=sys.stderr, flush=True)
        comm.abort(1)

    sys.excepthook = hook


def get_comm(backend: str = "auto") -> Comm:
    """Return the process-wide communicator for ``backend`` (created once)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "horovod" if horovod_available() else "torch"
    if backend not in _CACHE:
        if backend == "horovod" and not horovod_available():
            raise RuntimeError("backend=horovod but horovod.torch does not import "
                               "(run 'make install', or choose backend=torch)")
        cls = {"horovod": HorovodComm, "torch": TorchComm, "mpi": Comm}[backend]
        comm = cls()
        if comm.size > 1:  # after the backend's set-up: torch.distributed installs a hook of its own
            install_abort_hook(comm)
        _CACHE[backend] = comm
    return _CACHE[backend]


def _check_op(op: str) -> None:
    if op not in ("mean", "sum"):
        raise ValueError(f"allreduce op must be 'mean' or 'sum', not {op!r}")


def _split_type_shared() -> int:
    from mpi4py import MPI
    return MPI.COMM_TYPE_SHARED


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _set_cpu_threads(device: torch.device, local_size: int) -> None:
    """Share the node's cores between its ranks unless the user set OMP_NUM_THREADS."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, local_size)))


def _free_address() -> tuple[str, int]:
    """A host address the other ranks can reach and a port that is free on it now."""
    host = socket.gethostname()
    try:
        host = socket.gethostbyname(host)
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return host, port
