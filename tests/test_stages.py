"""The stage registry (hpc_uc.stages): what reruns when a key changes, which stages a method
runs, and that looking stages up imports no torch."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from conftest import REPO, replace_stage_bodies, tiny_config
from hpc_uc.config import CHOICES, DEFAULTS
from hpc_uc.errors import UserError
from hpc_uc.pipeline import check_inputs, run_all, start
from hpc_uc.stages import METHODS, RUN_KEYS, STAGES, stage_keys


def _stage_owned_keys() -> list[str]:
    """The config keys the run and the stages own, before any method adds its train keys."""
    return [*RUN_KEYS, *(key for stage in STAGES.values() for key in stage.keys)]


def test_every_method_is_registered_and_runs_its_stages_in_order():
    assert set(METHODS) == set(CHOICES["method"])
    order = list(STAGES)
    for method in METHODS.values():
        assert [order.index(name) for name in method.stages] == sorted(order.index(n) for n in method.stages)
        assert {"train", "export", "evaluate"} <= set(method.stages)
    keys = _stage_owned_keys()
    assert len(keys) == len(set(keys)), "a key belongs to one stage"
    for method in METHODS.values():  # a method's train keys are its train stage's, no other stage's
        assert not set(method.keys) & set(keys), method.name


def test_every_config_key_is_owned_by_a_stage_a_method_or_none_by_design():
    """A key dropped from a stage or a method would let a changed value reuse stale outputs."""
    owned = {*_stage_owned_keys(), *(k for m in METHODS.values() for k in m.keys)}
    # where the run goes and how it runs, not what it makes (profile only sets keys listed above)
    no_output = {"run_dir", "backend", "profile", "cache", "cache_budget_mib", "resume"}
    assert set(DEFAULTS) == owned | no_output
    assert not owned & no_output


def test_label_wise_methods_skip_the_clusters():
    for method in METHODS.values():
        if method.label_wise:
            assert "cluster" not in method.stages, method.name
    assert "cluster" in METHODS["uc"].stages
    assert METHODS["em"].stages == ("train", "export", "evaluate")  # its own model: no surrogate


def _changed(value):
    return {"changed": value} if isinstance(value, dict) else ["changed", value]


def _recording_run(digits_dir, tmp_path, monkeypatch, *overrides: str):
    """A run directory whose stage bodies only record their names, every stage run once:
    (the names recorded, the config, the communicator, the run directory)."""
    ran: list[str] = []
    replace_stage_bodies(monkeypatch, lambda name: lambda c, comm, r: ran.append(name) or {})
    monkeypatch.setattr("hpc_uc.report.report", lambda root: "")
    cfg = tiny_config(digits_dir, tmp_path / "run", *overrides)
    comm, run = start(cfg)
    run_all(cfg, comm, run)
    return ran, cfg, comm, run


@pytest.mark.parametrize("method", list(METHODS))
def test_changing_a_key_reruns_exactly_its_stage_and_the_later_ones(method, digits_dir, tmp_path, monkeypatch):
    """Stage bodies replaced by a recorder: which stages run is what is tested here."""
    ran, cfg, comm, run = _recording_run(digits_dir, tmp_path, monkeypatch, f"method={method}")
    stages = METHODS[method].stages
    assert ran == list(stages)
    for key in RUN_KEYS:  # the data, the seed, the lr rule: every stage the method runs
        cfg = copy.deepcopy(cfg)
        cfg[key] = _changed(cfg[key])
        ran.clear()
        run_all(cfg, comm, run)
        assert ran == list(stages), key
    for stage in STAGES.values():
        for key in stage_keys(stage.name, method):
            if key == "method":
                continue  # another method: other stages (below)
            cfg = copy.deepcopy(cfg)
            cfg[key] = _changed(cfg[key])
            ran.clear()
            run_all(cfg, comm, run)
            expected = list(stages[stages.index(stage.name):]) if stage.name in stages else []
            assert ran == expected, key
    others = {key for m in METHODS.values() for key in m.keys} - set(METHODS[method].keys)
    for key in sorted(others):  # another method's knob: nothing of this method runs again
        cfg = copy.deepcopy(cfg)
        cfg[key] = _changed(cfg[key])
        ran.clear()
        run_all(cfg, comm, run)
        assert ran == [], key


def test_switching_method_reruns_from_train_and_label_wise_runs_never_cluster(digits_dir, tmp_path, monkeypatch):
    ran, cfg, comm, run = _recording_run(digits_dir, tmp_path, monkeypatch)
    assert ran == list(STAGES)
    for method in ("classwise", "ar", "em", "uc"):
        ran.clear()
        run_all({**cfg, "method": method}, comm, run)
        assert ran == ["train", "export", "evaluate"], method  # the surrogate (and clusters) kept


def test_a_stage_the_method_does_not_run_is_refused(digits_dir, tmp_path):
    cfg = tiny_config(digits_dir, tmp_path / "run", "method=classwise")
    _, run = start(cfg)
    with pytest.raises(UserError, match="method=classwise has no cluster stage"):
        check_inputs("cluster", cfg, run)


def test_bad_input_fails_before_torch_is_imported(digits_dir):
    code = ("import sys\n"
            "from hpc_uc.cli import build_parser\n"
            "from hpc_uc.config import load_config\n"
            "from hpc_uc.errors import UserError\n"
            "from hpc_uc.pipeline import check_data\n"
            "build_parser()\n"
            f"cfg = load_config({str(REPO / 'configs' / 'digits.yaml')!r}, "
            f"['data_dir={digits_dir}', 'clusters=5000'])\n"
            "try:\n    check_data(cfg)\nexcept UserError as e:\n    print(e)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.splitlines() == ["clusters=5000 is more than the 1257 training samples", "False"]


def _rewrite_records(run, inputs_of) -> None:
    """stages.json as an older hpc-uc wrote it: each record's inputs ``inputs_of(inputs)`` and
    its key their hash, as stage_key hashed inputs then."""
    import hashlib
    import json

    records = json.loads(run._stages.read_text())
    for record in records.values():
        record["inputs"] = inputs_of(record["inputs"])
        record["key"] = hashlib.sha256(json.dumps(record["inputs"], sort_keys=True).encode()).hexdigest()[:16]
    run._stages.write_text(json.dumps(records))


def test_a_new_key_at_its_neutral_value_reruns_nothing(digits_dir, tmp_path, monkeypatch):
    """config.NEUTRAL: run directories made before a key existed (their sections lack it) and
    those made with it at its neutral value are up to date for today's config; the key at
    another value re-runs its stage and the later ones."""
    from hpc_uc.config import NEUTRAL

    ran, cfg, comm, run = _recording_run(digits_dir, tmp_path, monkeypatch)
    assert ran == list(STAGES)

    def with_keys(inputs: dict, present: bool) -> dict:
        inputs = copy.deepcopy(inputs)
        for dotted, neutral in NEUTRAL.items():
            section, key = dotted.split(".")
            if section in inputs:
                inputs[section].pop(key, None)
                if present:
                    inputs[section][key] = neutral
        return inputs

    for present in (False, True):  # before the keys existed; with them, hashed at neutral
        _rewrite_records(run, lambda inputs: with_keys(inputs, present))
        ran.clear()
        run_all(cfg, comm, run)
        assert ran == [], present
    for dotted, value, first in (("surrogate.optimizer", "sgd", "surrogate"), ("refine.init", "uniform", "export")):
        other = copy.deepcopy(cfg)
        section, key = dotted.split(".")
        other[section][key] = value
        ran.clear()
        run_all(other, comm, run)
        assert ran == list(STAGES)[list(STAGES).index(first):], dotted
        ran.clear()
        run_all(cfg, comm, run)  # back at neutral: the stages run again for it
        assert ran, dotted
