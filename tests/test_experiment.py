"""Experiment files: validation messages, defaults, overrides, identity."""

from pathlib import Path

import optuna
import pytest

from service.errors import ExperimentError, StudyError
from service.experiment import KNOBS, load_experiment, parse_experiment
from service.studies import open_storage, open_study_for

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiments_load(path):
    experiment = load_experiment(path)
    assert experiment.default_study_name == path.stem
    assert set(experiment.knobs) == set(KNOBS)


def test_the_three_seed_experiments_are_shipped():
    assert {p.name for p in EXPERIMENTS} >= {"digits.toml", "seed_sales.toml", "seed_circle.toml"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1", "colour: unknown key; allowed keys: name, description, data, model"),
        ("[search]\npack = 'big'", "search.pack = 'big': must be 'auto' or a whole number of at"),
        ("[search]\npack = 0", "search.pack = 0: must be 'auto' or a whole number of at least 1"),
        ("[model]\nwidth = 3", "model.width: unknown key; allowed keys: hidden, activation"),
        ("[search.space.lr_base]\nhi = 2", "search.space.lr_base.hi: unknown key"),
        ("[search.space.momentum]\nlow = 0", "search.space.momentum: unknown key"),
        (
            "[search.space.decay_rate]\nhigh = 1.5",
            "search.space.decay_rate.high: 1.5 is out of range; allowed: 0 < decay_rate <= 1",
        ),
        (
            "[search.space.ema_decay]\nvalue = 1.0",
            "search.space.ema_decay.value: 1.0 is out of range; allowed: 0 <= ema_decay < 1",
        ),
        (
            "[search.space.decay_steps]\nlow = 0",
            "search.space.decay_steps.low: 0 is out of range; allowed: decay_steps >= 1",
        ),
        ("[search.space.lr_base]\nlow = 0.5\nhigh = 0.1", "lr_base.low: 0.5 must be below high"),
        ("[search.space.lr_base]\nlow = 2.0", "lr_base.low: 2.0 leaves an empty range"),
        ("[search.space.staircase]\nlow = 0", "staircase: takes choices, value or grid"),
        ("[model]\nactivation = 'gelu'", "model.activation = 'gelu': Input should be 'relu'"),
        ("[loss]\nkind = 'hinge'", "loss.kind = 'hinge': Input should be 'mse', 'piecewise'"),
        ("[training]\nsteps = 0", "training.steps = 0: Input should be greater than or equal"),
        ("[search]\nsampler = 'cmaes'", "search.sampler = 'cmaes': Input should be 'tpe'"),
        ("[search]\nsampler = 'grid'", "search.space.lr_base: sampler = 'grid' needs grid"),
        ("[data]\nsource = 'csv'", "data.path: missing; source = 'csv' needs the file's path"),
        ("[data]\nsource = 'digits'\npath = 'x.csv'", "data.path: applies to csv/npz sources"),
        ("[loss]\nkind = 'mse'\ncost = 2", "loss.cost: applies to kind = 'piecewise' only"),
        ("[data]\nsource = 'sales'", "loss.kind: 'softmax_cross_entropy' needs class labels"),
        ("[model]\nhidden = [4, 0]", "model.hidden: sizes must be at least 1"),
        ("name = 'a b'", "name = 'a b': String should match pattern"),
        ("[training]\nsteps = '10'", "training.steps = '10': Input should be a valid integer"),
        (
            "[search.space.lr_base]\nlow = 0.01\nhigh = 0.1\nlog = 'yes'",
            "search.space.lr_base.log = 'yes': Input should be a valid boolean",
        ),
        (
            "[search.space.staircase]\nchoices = ['yes']",
            "search.space.staircase.choices.0 = 'yes': Input should be a valid boolean",
        ),
        (
            "[data]\nsource = 'sales'\n[loss]\nkind = 'piecewise'\ncost = 0\nprofit = 0",
            "loss.cost: and profit are both 0",
        ),
        ("[model\nhidden = 1", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(text, message):
    with pytest.raises(ExperimentError) as caught:
        parse_experiment(text, path=Path("x.toml"))
    assert str(caught.value).startswith("x.toml: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ExperimentError, match="no such experiment file"):
        load_experiment(tmp_path / "missing.toml")
    with pytest.raises(ExperimentError, match="is a directory"):
        load_experiment(tmp_path)


def test_default_ranges_follow_the_design():
    knobs = parse_experiment("[training]\nsteps = 250").knobs
    assert (knobs["lr_base"].low, knobs["lr_base"].high, knobs["lr_base"].log) == (1e-4, 1.0, True)
    assert (knobs["decay_rate"].low, knobs["decay_rate"].high) == (0.8, 1.0)
    assert not knobs["decay_rate"].log
    assert (knobs["decay_steps"].low, knobs["decay_steps"].high) == (1, 250)
    assert knobs["decay_steps"].log and knobs["decay_steps"].kind == "int"
    assert knobs["staircase"].choices == (False, True)
    assert (knobs["ema_decay"].low, knobs["ema_decay"].high, knobs["ema_decay"].log) == (
        0.9,
        0.9999,
        True,
    )


def test_narrow_widen_and_fix():
    knobs = parse_experiment(
        """
        [search.space.lr_base]
        low = 1e-6
        [search.space.decay_rate]
        low = 0.95
        high = 0.99
        [search.space.staircase]
        value = true
        [search.space.decay_steps]
        value = 100
        [search.space.ema_decay]
        choices = []
        """.replace("[search.space.ema_decay]\n        choices = []", "")
    ).knobs
    assert (knobs["lr_base"].low, knobs["lr_base"].high) == (1e-6, 1.0)  # widened below
    assert (knobs["decay_rate"].low, knobs["decay_rate"].high) == (0.95, 0.99)  # narrowed
    assert knobs["staircase"].fixed and knobs["staircase"].value is True
    assert knobs["decay_steps"].value == 100 and isinstance(knobs["decay_steps"].value, int)
    assert knobs["ema_decay"].low == 0.9  # untouched


def test_one_staircase_choice_fixes_it():
    knobs = parse_experiment("[search.space.staircase]\nchoices = [true]").knobs
    assert knobs["staircase"].fixed and knobs["staircase"].value is True


def test_identity_ignores_trial_count_pack_and_description():
    a = parse_experiment("description = 'a'\n[search]\ntrials = 5\npack = 2")
    b = parse_experiment("description = 'b'\n[search]\ntrials = 50\npack = 16")
    c = parse_experiment("[search]\nseed = 1")
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_a_study_resumes_with_another_log_every_but_not_other_steps(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    base = "[training]\nsteps = 100\nlog_every = 1\n"
    first = open_study_for(parse_experiment(base), name="s", storage=storage)
    first.add_trial(optuna.trial.create_trial(value=1.0))
    # log_every only thins the curves: the stored study (its fingerprint has log_every = 1) goes on
    resumed = parse_experiment(base.replace("log_every = 1", "log_every = 10"))
    assert open_study_for(resumed, name="s", storage=storage).trials[0].value == 1.0
    # what the trials train still has to match
    longer = parse_experiment(base.replace("steps = 100", "steps = 200"))
    with pytest.raises(StudyError, match=r"differs in training\.steps\)"):
        open_study_for(longer, name="s", storage=storage)
    both = parse_experiment(base.replace("steps = 100", "steps = 200").replace("= 1\n", "= 5\n"))
    with pytest.raises(StudyError, match=r"differs in training\.steps\)"):
        open_study_for(both, name="s", storage=storage)


def test_relative_data_path_resolves_next_to_the_file(tmp_path):
    path = tmp_path / "sub" / "e.toml"
    path.parent.mkdir()
    path.write_text(
        "[data]\nsource = 'csv'\npath = 'data.csv'\ntask = 'regression'\n[loss]\nkind='mse'"
    )
    assert load_experiment(path).data.path == tmp_path / "sub" / "data.csv"
