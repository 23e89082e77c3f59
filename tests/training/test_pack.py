"""A trial trained in a pack gives the curves of the same trial trained alone, and of a plain
reference loop (torch.optim.SGD + LambdaLR + a hand-written EMA), on every loss."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.training import (
    ACTIVATIONS,
    Loss,
    NetworkShape,
    Schedule,
    TrainingConfig,
    TrainingData,
    TrialSpec,
    batch_table,
    init_parameters,
    train,
    train_trials,
)

CONFIG = TrainingConfig(steps=40, batch_size=16, eval_every=10)

SCHEDULES = [
    Schedule(lr_base=0.1, decay_rate=0.9, decay_steps=7, staircase=True, ema_decay=0.99),
    Schedule(lr_base=0.05, decay_rate=0.95, decay_steps=3, staircase=False, ema_decay=0.9),
    Schedule(lr_base=0.2, decay_rate=0.8, decay_steps=40, staircase=False, ema_decay=0.999),
    Schedule(lr_base=0.01, decay_rate=1.0, decay_steps=1, staircase=True, ema_decay=0.95),
]


def classification_data(num_classes: int = 3) -> TrainingData:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (num_classes > 2) * (x[:, 2] > 0.5)
    return TrainingData(x[:100], y[:100], x[100:], y[100:], num_classes=num_classes)


def regression_data() -> TrainingData:
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(120, 2)).astype(np.float32)
    y = (x.sum(1, keepdims=True) + rng.uniform(-0.05, 0.05, size=(120, 1))).astype(np.float32)
    return TrainingData(x[:90], y[:90], x[90:], y[90:])


CASES = {
    "mse": (Loss("mse"), NetworkShape(2, (6,), 1, "tanh"), regression_data()),
    "piecewise": (
        Loss("piecewise", cost=1, profit=9),
        NetworkShape(2, (), 1, bias=False),
        regression_data(),
    ),
    "softmax_cross_entropy": (
        Loss("softmax_cross_entropy"),
        NetworkShape(5, (8,), 3, "relu"),
        classification_data(),
    ),
    "cross_entropy": (
        Loss("cross_entropy"),
        NetworkShape(5, (8, 4), 3, "sigmoid"),
        classification_data(),
    ),
}


def reference_loop(shape, loss: Loss, data: TrainingData, spec: TrialSpec):
    """The way a PyTorch user writes it: nn.Linear layers, SGD, LambdaLR, an EMA by hand."""
    init = init_parameters(shape, spec.init_seed)
    per_layer = 2 if shape.bias else 1
    n_layers = len(init) // per_layer
    layers: list[torch.nn.Module] = []
    for i in range(n_layers):
        weight = init[per_layer * i]
        linear = torch.nn.Linear(*weight.shape, bias=shape.bias)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            if shape.bias:
                linear.bias.copy_(init[per_layer * i + 1][0])
        layers.append(linear)
        if i < n_layers - 1:
            layers.append(torch.nn.Module())
            layers[-1].forward = ACTIVATIONS[shape.activation]
    model = torch.nn.Sequential(*layers)

    def loss_fn(out, y):
        if loss.kind == "mse":
            return ((y - out) ** 2).mean()
        if loss.kind == "piecewise":
            return torch.where(out > y, loss.cost * (out - y), loss.profit * (y - out)).sum()
        if loss.kind == "softmax_cross_entropy":
            return F.cross_entropy(out, y)
        onehot = F.one_hot(y, out.shape[-1]).float()
        return -(onehot * torch.log(torch.clamp(torch.softmax(out, -1), 1e-12, 1.0))).mean()

    x_train = torch.tensor(data.x_train)
    y_train = torch.tensor(data.y_train)
    x_val, y_val = torch.tensor(data.x_val), torch.tensor(data.y_val)
    s = spec.schedule
    opt = torch.optim.SGD(model.parameters(), lr=s.lr_base)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda g: (
            s.decay_rate ** (math.floor(g / s.decay_steps) if s.staircase else g / s.decay_steps)
        ),
    )
    shadow = [p.detach().clone() for p in model.parameters()]
    table = batch_table(len(x_train), CONFIG.batch_size, CONFIG.steps, spec.data_seed)

    losses, lrs, evals = [], [], []
    for g in range(CONFIG.steps):
        rows = table[g]
        out = model(x_train[rows])
        value = loss_fn(out, y_train[rows])
        lrs.append(opt.param_groups[0]["lr"])
        losses.append(value.item())
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        d = min(s.ema_decay, (1 + g) / (10 + g))
        with torch.no_grad():
            for sh, p in zip(shadow, model.parameters(), strict=True):
                sh.copy_(d * sh + (1 - d) * p)
        if (g + 1) % CONFIG.eval_every == 0:
            evaluation = {"step": g + 1}
            with torch.no_grad():
                saved = [p.detach().clone() for p in model.parameters()]
                for prefix, weights in (("", saved), ("ema_", shadow)):
                    for p, w in zip(model.parameters(), weights, strict=True):
                        p.copy_(w)
                    out = model(x_val)
                    evaluation[f"{prefix}val_loss"] = loss_fn(out, y_val).item()
                    if data.num_classes:
                        predicted = (
                            out.argmax(-1) if out.shape[-1] > 1 else (out[:, 0] > 0.5).long()
                        )
                        correct = (predicted == y_val).float().mean().item()
                        evaluation[f"{prefix}val_accuracy"] = correct
                for p, w in zip(model.parameters(), saved, strict=True):
                    p.copy_(w)
            evals.append(evaluation)
    return losses, lrs, evals


def specs(seed_per_trial: bool = False) -> list[TrialSpec]:
    return [
        TrialSpec(
            key=i, schedule=s, init_seed=3 + i * seed_per_trial, data_seed=5 + i * seed_per_trial
        )
        for i, s in enumerate(SCHEDULES)
    ]


@pytest.mark.parametrize("loss_name", list(CASES))
@pytest.mark.parametrize("pack_size", [1, 2, 4])
def test_pack_matches_reference_loop(loss_name, pack_size):
    """Pack 2 runs the four trials two at a time: the last two train in refilled slots."""
    loss, shape, data = CASES[loss_name]
    trials = specs(seed_per_trial=True)
    curves = train_trials(shape, loss, data, CONFIG, trials, pack_size=pack_size)
    for spec, curve in zip(trials, curves, strict=True):
        ref_losses, ref_lrs, ref_evals = reference_loop(shape, loss, data, spec)
        assert curve.outcome is not None and curve.outcome.state == "complete"
        assert curve.steps == list(range(CONFIG.steps))
        np.testing.assert_allclose(curve.lr, ref_lrs, rtol=1e-6)
        np.testing.assert_allclose(curve.train_loss, ref_losses, rtol=2e-4, atol=1e-5)
        assert [step for step, _ in curve.evaluations] == [ref["step"] for ref in ref_evals]
        for (_, metrics), ref in zip(curve.evaluations, ref_evals, strict=True):
            assert metrics["val_loss"] == pytest.approx(ref["val_loss"], rel=2e-4, abs=1e-5)
            assert metrics["ema_val_loss"] == pytest.approx(ref["ema_val_loss"], rel=2e-4, abs=1e-5)
            if data.num_classes:
                assert metrics["val_accuracy"] == pytest.approx(ref["val_accuracy"], abs=1e-6)
                assert metrics["ema_val_accuracy"] == pytest.approx(
                    ref["ema_val_accuracy"], abs=1e-6
                )


@pytest.mark.parametrize("loss_name", list(CASES))
def test_trial_in_pack_equals_trial_alone(loss_name):
    loss, shape, data = CASES[loss_name]
    trials = specs()
    together = train_trials(shape, loss, data, CONFIG, trials, pack_size=4)
    for spec, packed in zip(trials, together, strict=True):
        (alone,) = train_trials(shape, loss, data, CONFIG, [spec], pack_size=1)
        np.testing.assert_allclose(packed.train_loss, alone.train_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(packed.lr, alone.lr, rtol=1e-12)
        assert packed.outcome.metrics == pytest.approx(alone.outcome.metrics, rel=1e-5, abs=1e-6)


class StopAt:
    """Hooks that collect curves and stop trial ``key`` at evaluation ``step``."""

    def __init__(self, specs, key, step):
        self.queue, self.key, self.step = list(specs), key, step
        self.curves = {spec.key: [] for spec in specs}
        self.evaluations = {spec.key: [] for spec in specs}
        self.ends = {}

    def next_trial(self):
        return self.queue.pop(0) if self.queue else None

    def on_curve(self, key, steps, train_loss, lr):
        self.curves[key] += train_loss.tolist()

    def on_evaluation(self, key, step, metrics):
        self.evaluations[key].append(step)
        if key == self.key and step == self.step:
            raise RuntimeError(f"stopped at {step}")

    def on_trial_end(self, outcome):
        self.ends[outcome.key] = outcome


def test_refilled_slot_gives_the_same_curves():
    """Trial 0 stops at step 10, so trial 2 starts in its slot beside trial 1 at step 10 of 40;
    later trials keep filling slots out of phase. Every curve equals the trial trained alone."""
    loss, shape, data = CASES["softmax_cross_entropy"]
    trials = [
        *specs(),
        TrialSpec(key=10, schedule=SCHEDULES[0], init_seed=3, data_seed=5),
        TrialSpec(key=11, schedule=SCHEDULES[1], init_seed=9, data_seed=8),
    ]
    hooks = StopAt(trials, key=0, step=10)
    train(shape, loss, data, CONFIG, hooks, pack_size=2)
    assert hooks.ends[0].state == "stopped" and hooks.ends[0].steps == 10
    for spec in trials[1:]:
        (alone,) = train_trials(shape, loss, data, CONFIG, [spec], pack_size=1)
        assert hooks.ends[spec.key].state == "complete"
        assert hooks.evaluations[spec.key] == [10, 20, 30, 40]
        np.testing.assert_allclose(hooks.curves[spec.key], alone.train_loss, rtol=1e-5, atol=1e-6)
        assert hooks.ends[spec.key].metrics == pytest.approx(alone.outcome.metrics, rel=1e-5)


def test_refills_out_of_phase_with_buffer_drains_and_thinned_curves():
    """Awkward numbers: 37 steps (the last evaluation is not on the 10-step grid), a 7-step
    buffer that fills between evaluations, a point every 3 steps, 7 trials through 3 slots, one
    stopped at step 20 so refills fall out of phase. Every trial matches itself alone."""
    loss, shape, data = CASES["mse"]
    config = TrainingConfig(steps=37, batch_size=16, eval_every=10, log_every=3, buffer_steps=7)
    trials = [
        TrialSpec(key=i, schedule=SCHEDULES[i % 4], init_seed=i, data_seed=i % 2) for i in range(7)
    ]

    class Hooks(StopAt):
        def on_curve(self, key, steps, train_loss, lr):
            points = zip(steps.tolist(), train_loss.tolist(), lr.tolist(), strict=True)
            self.curves[key] += list(points)

    hooks = Hooks(trials, key=1, step=20)
    train(shape, loss, data, config, hooks, pack_size=3)
    assert hooks.ends[1].state == "stopped"
    for spec in trials:
        (alone,) = train_trials(shape, loss, data, config, [spec], pack_size=1)
        steps, losses, lrs = map(list, zip(*hooks.curves[spec.key], strict=True))
        expected_steps = list(range(0, 21 if spec.key == 1 else 37, 3))
        assert steps == expected_steps == alone.steps[: len(expected_steps)]
        np.testing.assert_allclose(losses, alone.train_loss[: len(steps)], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lrs, alone.lr[: len(steps)], rtol=1e-12)
        if spec.key != 1:
            assert hooks.evaluations[spec.key] == [10, 20, 30, 37]
            assert hooks.ends[spec.key].metrics == pytest.approx(alone.outcome.metrics, rel=1e-5)


def test_common_random_numbers_by_default_and_own_seeds_on_request():
    loss, shape, data = CASES["mse"]
    same = Schedule(lr_base=0.1, decay_rate=1.0, decay_steps=1, staircase=False, ema_decay=0.9)
    shared = [TrialSpec(key=i, schedule=same, init_seed=0, data_seed=0) for i in range(2)]
    own = [TrialSpec(key=i, schedule=same, init_seed=i, data_seed=i) for i in range(2)]
    a, b = train_trials(shape, loss, data, CONFIG, shared)
    assert a.train_loss == b.train_loss
    c, d = train_trials(shape, loss, data, CONFIG, own)
    assert c.train_loss != d.train_loss


def test_diverging_trial_stops_and_its_pack_mates_go_on():
    loss, shape, data = CASES["mse"]
    calm = Schedule(lr_base=0.05, decay_rate=1.0, decay_steps=1, staircase=False, ema_decay=0.9)
    wild = Schedule(lr_base=1e4, decay_rate=1.0, decay_steps=1, staircase=False, ema_decay=0.9)
    trials = [
        TrialSpec(key="calm", schedule=calm, init_seed=0, data_seed=0),
        TrialSpec(key="wild", schedule=wild, init_seed=0, data_seed=0),
    ]
    calm_curve, wild_curve = train_trials(shape, loss, data, CONFIG, trials)
    (alone,) = train_trials(shape, loss, data, CONFIG, trials[:1])
    assert wild_curve.outcome.state == "diverged"
    assert "train_loss became" in wild_curve.outcome.reason
    assert all(np.isfinite(wild_curve.train_loss))
    assert len(wild_curve.train_loss) < CONFIG.steps
    assert calm_curve.outcome.state == "complete"
    np.testing.assert_allclose(calm_curve.train_loss, alone.train_loss, rtol=1e-6)


def test_exception_from_evaluation_hook_stops_only_that_trial():
    loss, shape, data = CASES["mse"]
    hooks = StopAt(specs(), key=1, step=20)
    train(shape, loss, data, CONFIG, hooks, pack_size=4)
    assert hooks.ends[1].state == "stopped" and isinstance(hooks.ends[1].error, RuntimeError)
    assert hooks.ends[1].steps == 20 and hooks.ends[1].reason == "stopped at 20"
    assert {k: o.state for k, o in hooks.ends.items() if k != 1} == {
        0: "complete",
        2: "complete",
        3: "complete",
    }


def test_log_every_thins_the_curve():
    loss, shape, data = CASES["mse"]
    config = TrainingConfig(steps=40, batch_size=16, eval_every=10, log_every=5)
    (curve,) = train_trials(shape, loss, data, config, specs()[:1])
    assert curve.steps == [*range(0, 40, 5), 39]  # and the last update, so the curve ends
    (every,) = train_trials(shape, loss, data, replace(config, log_every=1), specs()[:1])
    assert curve.train_loss == [every.train_loss[s] for s in curve.steps]


def test_a_stop_during_a_report_still_ends_the_trials_that_ended_before_it():
    """Ctrl-C raised by a hook while a report is handed out: the trials that completed earlier in
    that report are still told, so their results are kept rather than trained again."""
    loss, shape, data = CASES["mse"]

    class Interrupt(StopAt):
        def on_evaluation(self, key, step, metrics):
            super().on_evaluation(key, step, metrics)
            if key == 1 and step == CONFIG.steps:
                raise KeyboardInterrupt

    hooks = Interrupt(specs()[:2], key=None, step=None)
    with pytest.raises(KeyboardInterrupt):
        train(shape, loss, data, CONFIG, hooks, pack_size=2)
    assert list(hooks.ends) == [0] and hooks.ends[0].state == "complete"


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_pack_shrinks_to_its_last_trials_and_their_curves_stay_the_same(device, monkeypatch):
    """Eight trials in a pack of 8; six stop at step 10 and none is left to start, so the last
    two go on in a pack of 2, from where they were, as if they had trained alone (on CUDA, the
    smaller pack captures its own graph)."""
    from service.training import trainer

    loss, shape, data = CASES["softmax_cross_entropy"]
    trials = [
        TrialSpec(key=i, schedule=SCHEDULES[i % 4], init_seed=i, data_seed=i % 3) for i in range(8)
    ]
    sizes = []
    shrunk = trainer._Pack.shrunk

    def record(pack):
        small = shrunk(pack)
        sizes.append((pack.capacity, small.capacity))
        return small

    monkeypatch.setattr(trainer._Pack, "shrunk", record)

    class StopMost(StopAt):
        def on_curve(self, key, steps, train_loss, lr):
            self.curves[key] += list(zip(steps.tolist(), train_loss.tolist(), strict=True))

        def on_evaluation(self, key, step, metrics):
            self.evaluations[key].append((step, metrics))
            if key not in (3, 6) and step == 10:
                raise RuntimeError("stopped")

    hooks = StopMost(trials, key=None, step=None)
    train(shape, loss, data, CONFIG, hooks, pack_size=8, device=device)
    assert sizes == [(8, 2)]
    for key in (3, 6):
        (alone,) = train_trials(
            shape, loss, data, CONFIG, [trials[key]], pack_size=1, device=device
        )
        steps, losses = map(list, zip(*hooks.curves[key], strict=True))
        assert steps == alone.steps == list(range(CONFIG.steps))
        np.testing.assert_allclose(losses, alone.train_loss, rtol=1e-5, atol=1e-6)
        assert [step for step, _ in hooks.evaluations[key]] == [10, 20, 30, 40]
        assert hooks.ends[key].state == "complete"
        assert hooks.ends[key].metrics == pytest.approx(alone.outcome.metrics, rel=1e-5)
        pairs = zip(hooks.ends[key].ema_parameters, alone.outcome.ema_parameters, strict=True)
        for got, want in pairs:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_only_the_slots_due_are_evaluated_and_alike():
    from service.training.trainer import _Pack

    loss, shape, data = CASES["softmax_cross_entropy"]
    pack = _Pack(shape, loss, data, CONFIG, 4, torch.device("cpu"))
    for slot, spec in enumerate(specs()):
        pack.assign(slot, spec)
    pack.sync_slots()
    for _ in range(5):
        pack.step()
    every = pack.evaluate([0, 1, 2, 3])
    some = pack.evaluate([3, 1])
    assert list(some) == [3, 1]
    for slot in (1, 3):
        assert some[slot] == pytest.approx(every[slot], rel=1e-6)


def _step_tensors(pack) -> dict[str, int]:
    """Where each tensor the training step reads or writes lives."""
    named = {f"param{i}": p for i, p in enumerate(pack.params)}
    named |= {f"shadow{i}": s for i, s in enumerate(pack.shadows)}
    named |= {f"knob:{name}": t for name, t in pack.knobs.items()}
    for name in ("global_step", "active", "table_of_slot", "cursor", "loss_buffer", "lr_buffer"):
        named[name] = getattr(pack, name)
    return {name: t.data_ptr() for name, t in named.items()}


def test_the_step_reads_and_writes_the_same_tensors_through_refills():
    """A CUDA graph replays the kernels of its capture on the tensors it captured: the pack
    may change their contents (refilled slots, new knobs, drained buffers), never replace
    them. The batch tables, a row per data seed in use, are replaced only to grow."""
    from service.training.trainer import _Pack

    loss, shape, data = CASES["softmax_cross_entropy"]
    pack = _Pack(shape, loss, data, CONFIG, capacity=2, device=torch.device("cpu"))
    trials = specs()
    pack.assign(0, trials[0])
    pack.assign(1, trials[1])
    pack.sync_slots()
    where, tables = _step_tensors(pack), pack.tables
    for _ in range(5):
        pack.step()
    pack.drain()
    pack.free(1)
    pack.assign(1, trials[2])
    pack.sync_slots()
    pack.step()
    assert _step_tensors(pack) == where
    assert pack.tables is tables  # the same data seed: the same tables
    assert pack.steps_done.tolist() == [6, 1]
    assert pack.global_step.tolist() == [6, 1]
    assert pack.knobs["lr_base"].tolist() == [SCHEDULES[0].lr_base, SCHEDULES[2].lr_base]
    own = TrialSpec(key=9, schedule=SCHEDULES[3], init_seed=1, data_seed=77)
    pack.free(0)
    pack.assign(0, own)
    pack.sync_slots()  # a second seed: a second row
    assert _step_tensors(pack) == where and pack.tables is not tables
    tables = pack.tables
    assert tables.shape[0] == 2
    for slot, seed in ((0, 78), (1, 79)):  # each replaces a seed no slot uses any more
        pack.free(slot)
        pack.assign(slot, TrialSpec(key=seed, schedule=SCHEDULES[0], init_seed=1, data_seed=seed))
        pack.sync_slots()
        assert pack.tables is tables
    rows = pack.table_of_slot.tolist()
    assert sorted(rows) == [0, 1]
    for slot, seed in ((0, 78), (1, 79)):
        expected = batch_table(len(data.x_train), CONFIG.batch_size, CONFIG.steps, seed)
        assert torch.equal(pack.tables[rows[slot]], expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("data_seeds", [(5, 5, 5, 5), (5, 5, 6, 7)])
def test_cuda_graph_gives_the_curves_of_the_step_launched_kernel_by_kernel(data_seeds, monkeypatch):
    """Four trials through two slots, with the step replayed as a CUDA graph and without it.
    With seeds 5, 5, 6, 7 the refill needs a second batch table: the tables grow, and the
    graph, which read the old tensor, is captured again."""
    from service.training.trainer import _Pack

    captures = []
    capture = _Pack._capture
    monkeypatch.setattr(_Pack, "_capture", lambda pack: captures.append(1) or capture(pack))
    loss, shape, data = CASES["softmax_cross_entropy"]
    trials = [
        TrialSpec(key=i, schedule=s, init_seed=3, data_seed=seed)
        for i, (s, seed) in enumerate(zip(SCHEDULES, data_seeds, strict=True))
    ]
    graph = train_trials(shape, loss, data, CONFIG, trials, pack_size=2, device="cuda")
    assert len(captures) == 1 + (len(set(data_seeds)) > 2)
    eager = train_trials(
        shape, loss, data, CONFIG, trials, pack_size=2, device="cuda", cuda_graph=False
    )
    assert len(captures) == 1 + (len(set(data_seeds)) > 2)  # none without the graph
    for a, b in zip(graph, eager, strict=True):
        np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.lr, b.lr, rtol=1e-12)
        assert a.steps == b.steps == list(range(CONFIG.steps))
        assert a.outcome.metrics == pytest.approx(b.outcome.metrics, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pack_matches_cpu():
    loss, shape, data = CASES["softmax_cross_entropy"]
    trials = specs()
    cpu = train_trials(shape, loss, data, CONFIG, trials, device="cpu")
    gpu = train_trials(shape, loss, data, CONFIG, trials, device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.lr, b.lr, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_never_waits_for_the_device():
    """Training steps raise if anything in them would make the host wait for the GPU."""
    from service.training.trainer import GRAPH_WARMUP, _Pack

    loss, shape, data = CASES["softmax_cross_entropy"]
    for cuda_graph in (False, True):
        pack = _Pack(
            shape,
            loss,
            data,
            CONFIG,
            capacity=4,
            device=torch.device("cuda"),
            cuda_graph=cuda_graph,
        )
        for slot, spec in enumerate(specs()):
            pack.assign(slot, spec)
        pack.sync_slots()
        for _ in range(GRAPH_WARMUP + 1):  # with the graph: warm-up and capture (it syncs)
            pack.step()
        assert (pack._graph is not None) == cuda_graph
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(CONFIG.eval_every - GRAPH_WARMUP - 1):
                pack.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        losses, _ = pack.drain()
        assert losses.shape == (4, CONFIG.eval_every)
        assert np.isfinite(losses).all() and (losses[:, 1:] != losses[:, :1]).any()
