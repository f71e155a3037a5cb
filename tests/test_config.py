"""Config resolution and every bad-config error: one line, before any heavy work."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import REPO, venv_bin
from hpc_uc.config import CHOICES, DEFAULTS, RULES, check_world, load_config, parse_override, scaled_lr
from hpc_uc.errors import UserError

DIGITS = REPO / "configs" / "digits.yaml"


def test_overrides_profiles_and_nesting():
    cfg = load_config(DIGITS, ["generator.epochs=3", "epsilon=0.03", "profile=paper"])
    assert cfg["generator"]["epochs"] == 3 and cfg["epsilon"] == 0.03
    assert cfg["profile"] == "paper" and cfg["surrogate"]["epochs"] == 15
    fast = load_config(DIGITS, ["profile=fast"])
    assert fast["surrogate"]["epochs"] == 8 and fast["generator"]["base_filters"] == 16
    assert parse_override("a.b=null") == {"a": {"b": None}}


@pytest.mark.parametrize("override, message", [
    ("no_such_key=1", "unknown config key 'no_such_key'"),
    ("generator.nope=1", "unknown config key 'generator.nope'"),
    ("epsilon=0", "epsilon must be in (0, 1]"),
    ("epsilon=1.5", "epsilon must be in (0, 1]"),
    ("clusters=1", "clusters must be >= 2"),
    ("norm=l3", "norm must be one of"),
    ("batch_size=0", "batch_size must be >= 1"),
    ("victim.select=loss", "victim.select must be one of auc, acc"),
])
def test_bad_values(override, message):
    with pytest.raises(UserError) as err:
        load_config(DIGITS, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("generator.lr=abc", "generator.lr must be a number, not 'abc'"),
    ("generator.lr=0", "generator.lr must be > 0"),
    ("kmeans.iters=abc", "kmeans.iters must be an integer, not 'abc'"),
    ("kmeans.iters=1.5", "kmeans.iters must be an integer"),
    ("generator.base_filters=0", "generator.base_filters must be >= 1"),
    ("resume=maybe", "resume must be true or false, not 'maybe'"),
    ("seed=-1", "seed must be >= 0"),
    ("victim.ue.momentum=1.5", "victim.ue.momentum must be >= 0 and <= 1"),
    ("surrogate.input_size=4", "surrogate.input_size must be >= 8"),
    ("victim.milestones=[0.5,2]", "victim.milestones must be a list of fractions in (0, 1)"),
    ("defenses=jpeg10", "defenses must be a list"),
    ("data_dir=", "data_dir must be a non-empty string"),
    ("generator.min_lr=1", "generator.min_lr (1) must not exceed generator.lr"),
    ("generator.augment=maybe", "generator.augment must be true or false"),
])
def test_every_key_is_checked_up_front(override, message):
    with pytest.raises(UserError) as err:
        load_config(DIGITS, [override])
    assert message in str(err.value)


def test_the_rule_table_covers_every_key():
    """A key added to DEFAULTS without a rule would pass unchecked into a stage."""
    def leaves(d: dict, where: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= leaves(v, f"{where}{k}.") if isinstance(v, dict) else {f"{where}{k}"}
        return out
    assert leaves(DEFAULTS) == set(CHOICES) | set(RULES) | {"epsilon"}


def test_numbers_written_as_text_are_read_as_numbers():
    cfg = load_config(DIGITS, ["generator.lr=1e-3", "victim.ue.lr=5e-2"])
    assert cfg["generator"]["lr"] == 1e-3 and cfg["victim"]["ue"]["lr"] == 0.05


@pytest.mark.parametrize("profiles, message", [
    ("profiles:\n  fsat: {victim: {epochs: 1}}\n", "profiles.fsat is not a profile"),
    ("profiles:\n  paper: {victim: {epoch: 1}}\n", "unknown config key 'profiles.paper.victim.epoch'"),
])
def test_every_profile_section_is_checked(profiles, message, tmp_path):
    """A misspelled profile section or key fails even when that profile is not the one in use."""
    path = tmp_path / "c.yaml"
    path.write_text("dataset: digits\n" + profiles)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(path, ["profile=fast"])


def test_batch_must_divide_over_ranks():
    cfg = load_config(DIGITS, ["batch_size=63"])
    with pytest.raises(UserError, match="multiple of the number of ranks"):
        check_world(cfg, 2)
    assert check_world(load_config(DIGITS, ["batch_size=64"]), 2) == 32
    with pytest.raises(UserError):
        check_world(load_config(DIGITS, ["batch_size=1"]), 2)


def test_lr_scaling():
    cfg = load_config(DIGITS, ["lr_scaling=sqrt"])
    assert scaled_lr(cfg, 1e-3, 1024) == pytest.approx(2e-3)
    cfg = load_config(DIGITS, ["lr_scaling=linear"])
    assert scaled_lr(cfg, 1e-3, 64) == pytest.approx(2.5e-4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([venv_bin("hpc-uc"), *args], capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0]


@pytest.mark.parametrize("override, fragment", [
    ("bogus=1", "unknown config key"),
    ("epsilon=-0.1", "epsilon must be in (0, 1]"),
    ("data_dir=/nonexistent/digits", "does not exist"),
])
def test_cli_bad_config_is_one_line(override, fragment, tmp_path):
    _one_line_error(_cli("train", str(DIGITS), override, f"run_dir={tmp_path / 'run'}"), fragment)
    assert not (tmp_path / "run").exists()


def test_cli_checks_data_dependent_values_before_work(digits_dir, tmp_path):
    run = f"run_dir={tmp_path / 'run'}"
    data = f"data_dir={digits_dir}"
    _one_line_error(_cli("run", str(DIGITS), data, run, "clusters=5000"), "more than the")
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_weights)
    _one_line_error(_cli("run", str(DIGITS), data, run, f"surrogate.weights={not_weights}"), str(not_weights))
    _one_line_error(_cli("run", str(DIGITS), data, run, "surrogate.weights=/no/such.pt"), "is not a file")


def test_missing_config_file():
    _one_line_error(_cli("run", "/no/such.yaml"), "not found")


@pytest.mark.parametrize("name", ["digits", "breastmnist", "pathmnist", "bloodmnist", "organamnist",
                                  "pets", "flowers102"])
@pytest.mark.parametrize("profile", ["fast", "paper"])
def test_every_dataset_config_loads(name, profile):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [f"profile={profile}"])
    assert cfg["dataset"] == name and cfg["data_dir"] == f"data/{name}"
