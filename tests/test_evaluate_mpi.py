"""Victim measurement across 2 ranks: every test and val sample is gathered exactly once, in
order, and the figures (test ACC/AUC, the attacker's re-fit) equal those of one process."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.__main__ import main as prep_main
from conftest import single_rank
from hpc_uc.config import load_config
from hpc_uc.evaluate import Splits, build_victim, measure, predict_with_features
from hpc_uc.export import read_whole_split

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def digits_shared():
    from hpc_uc.comm import get_comm

    mpi = get_comm("mpi")
    path = Path(mpi.broadcast(tempfile.mkdtemp(prefix="hpc-uc-eval-") if mpi.is_root else None))
    prep_main(["digits", "--shards", "3", "--out", str(path / "digits")])  # collective: every rank writes
    mpi.barrier()
    yield path / "digits"
    mpi.barrier()
    if mpi.is_root:
        shutil.rmtree(path, ignore_errors=True)


def test_two_ranks_measure_like_one(comm, digits_shared):
    cfg = load_config(None, [f"data_dir={digits_shared}", "victim.stem=standard", "cache=never"])
    splits = Splits(cfg, comm)
    torch.manual_seed(3)
    model = build_victim(cfg, splits.test.manifest).eval()
    gathered = predict_with_features(model, splits.test, comm)
    got = measure(cfg, model, splits, comm)
    if not comm.is_root:
        assert gathered is None and got == {}
        return
    _, labels, _ = read_whole_split(digits_shared, "test")
    assert np.array_equal(gathered[2], labels)  # every sample once, in global order
    solo = single_rank()
    alone = predict_with_features(model, Splits(cfg, solo).test, solo)
    np.testing.assert_allclose(gathered[0], alone[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gathered[1], alone[1], rtol=1e-4, atol=1e-5)
    want = measure(cfg, model, Splits(cfg, solo), solo)
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], abs=2e-3), key
    assert got["recalibrated_acc"] > 0.3  # 100 clean images re-fit an untrained net's features
