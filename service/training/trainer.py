"""Trains many trials of one network shape together, as one batched program (a pack).

A pack has K slots. Each slot holds one trial: its own weights, EMA shadows, global step and
schedule, stored as the k-th entry of stacked tensors, so one forward/backward pass trains all K.
When a trial ends, its slot is refilled at once with the next trial (continuous batching), so a
trial's curves do not depend on what else shares the pack.

The loop reads top to bottom: batch → forward → loss → backward → lr → SGD step → EMA → log.
Losses stay on the device and reach the host only at logging points (evaluations, or when the
buffer fills), so on CUDA there is no host sync per step. On CUDA the step is also captured as
a CUDA graph (``cuda_graph``, on by default): a step of a small network is dozens of tiny
kernels, and replaying them as one graph saves their launches. Progress goes out through a
:class:`PackHooks` object; an exception raised from ``on_evaluation`` (a pruning decision, say)
stops that trial only.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from service.training.losses import Loss
from service.training.network import NetworkShape, forward, init_parameters
from service.training.schedule import ema_decay_at, exponential_decay

__all__ = [
    "Curves",
    "PackHooks",
    "Schedule",
    "TrainingConfig",
    "TrainingData",
    "TrialOutcome",
    "TrialSpec",
    "batch_table",
    "resolve_device",
    "train",
    "train_trials",
]

OutcomeState = Literal["complete", "stopped", "diverged"]

# eager steps before a CUDA graph is captured: PyTorch asks for a few on the capture's stream
# (cuBLAS handles, autograd's and the allocator's lazy set-up must not happen mid-capture)
GRAPH_WARMUP = 3
# Once no trial is left to start, a pack this many times larger than the trials still training
# is replaced by one of their size: the step's cost follows the pack's size, not its trials'.
SHRINK = 4
# why a capture failed in this process, if one did: later packs do not try again (a failed
# capture keeps its memory pool)
_capture_failures: list[str] = []


@dataclass(frozen=True)
class Schedule:
    """The five knobs of one trial."""

    lr_base: float
    decay_rate: float
    decay_steps: int
    staircase: bool
    ema_decay: float


@dataclass(frozen=True)
class TrialSpec:
    """A trial to train: an opaque ``key`` for the hooks, its knobs and its seeds.

    ``init_seed`` draws the initial weights, ``data_seed`` the batch order; trials that share
    them (the default in a study) differ only by their knobs.
    """

    key: Hashable
    schedule: Schedule
    init_seed: int
    data_seed: int


@dataclass(frozen=True)
class TrainingConfig:
    """The budget of every trial: ``steps`` optimiser updates of ``batch_size`` examples, an
    evaluation every ``eval_every`` updates (and after the last), a curve point every
    ``log_every`` updates (and at the last of all ``steps``)."""

    steps: int
    batch_size: int
    eval_every: int
    log_every: int = 1
    buffer_steps: int = 256

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "log_every", "buffer_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainingData:
    """Training and validation arrays; ``num_classes`` is set for classification (labels in y)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int | None = None


@dataclass
class TrialOutcome:
    """How a trial ended: ``complete`` (all steps), ``stopped`` (a hook raised ``error``) or
    ``diverged`` (a loss became NaN/inf; ``reason`` says where). ``metrics`` are the last
    evaluation's; a complete trial also hands back its final raw and EMA parameters."""

    key: Hashable
    state: OutcomeState
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    error: BaseException | None = None
    parameters: list[np.ndarray] = field(default_factory=list, repr=False)
    ema_parameters: list[np.ndarray] = field(default_factory=list, repr=False)


class PackHooks(Protocol):
    """How a pack talks to the outside world; it knows nothing of Optuna or MLflow."""

    def next_trial(self) -> TrialSpec | None:
        """The trial for a free slot, or None when there is nothing more to train."""
        ...

    def on_curve(
        self, key: Hashable, steps: np.ndarray, train_loss: np.ndarray, lr: np.ndarray
    ) -> None:
        """Curve points of one trial: the loss of the update at each global step and its lr."""
        ...

    def on_evaluation(self, key: Hashable, step: int, metrics: dict[str, float]) -> None:
        """An evaluation after ``step`` updates; raising stops this trial (and only it)."""
        ...

    def on_trial_end(self, outcome: TrialOutcome) -> None: ...


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is one; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: torch sees {count} CUDA device(s), from cuda:0")
    return device


def batch_table(n_examples: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """Row indices of the batch used at each global step: ``(steps, batch_size)``.

    Each epoch is a fresh permutation drawn from ``seed``; the incomplete last batch of an
    epoch is dropped so every update sees ``batch_size`` examples.
    """
    batch_size = min(batch_size, n_examples)
    per_epoch = n_examples // batch_size
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-steps // per_epoch)
    perms = [
        torch.randperm(n_examples, generator=generator)[: per_epoch * batch_size]
        for _ in range(epochs)
    ]
    return torch.cat(perms).view(-1, batch_size)[:steps]


class _Pack:
    """The device-side state of K slots and the host-side bookkeeping that mirrors it."""

    def __init__(
        self,
        shape: NetworkShape,
        loss: Loss,
        data: TrainingData,
        config: TrainingConfig,
        capacity: int,
        device: torch.device,
        *,
        cuda_graph: bool = True,
        like: _Pack | None = None,
    ) -> None:
        self.shape, self.loss, self.config, self.device = shape, loss, config, device
        self.data, self.capacity = data, capacity
        # Every tensor the step reads or writes is allocated here once and then only written in
        # place, so that a captured graph's replays see the slots' current contents.
        self.cuda_graph = cuda_graph and device.type == "cuda" and not _capture_failures
        self._graph: torch.cuda.CUDAGraph | None = None
        self._stream = torch.cuda.Stream(device) if self.cuda_graph else None
        self._eager_steps = 0
        to = dict(device=device)
        template = init_parameters(shape, 0)
        self.params = [torch.zeros(capacity, *p.shape, **to).requires_grad_() for p in template]
        self.shadows = [torch.zeros(capacity, *p.shape, **to) for p in template]
        if like is not None:  # a smaller pack for the same trials: the data stays where it is
            for name in ("x_train", "y_train", "x_val", "y_val", "labels_val", "tables"):
                setattr(self, name, getattr(like, name))
            self._init_cache = like._init_cache
            self._table_row, self._free_rows = dict(like._table_row), list(like._free_rows)
        else:
            self.x_train = torch.as_tensor(data.x_train, dtype=torch.float32).to(**to)
            self.y_train = loss.targets(data.y_train, shape.outputs).to(**to)
            self.x_val = torch.as_tensor(data.x_val, dtype=torch.float32).to(**to)
            self.y_val = loss.targets(data.y_val, shape.outputs).to(**to)
            self.labels_val = (
                torch.as_tensor(data.y_val, dtype=torch.long).reshape(-1).to(**to)
                if data.num_classes is not None
                else None
            )
            self._init_cache: dict[int, list[torch.Tensor]] = {}
            # One batch table per data seed in use, in rows of ``tables``; a seed's row is
            # reused in place once no slot uses it, so the tensor changes only when it must grow.
            batch = min(config.batch_size, len(data.x_train))
            self.tables = torch.zeros(1, config.steps, batch, dtype=torch.long, **to)
            self._table_row: dict[int, int] = {}
            self._free_rows = [0]
        self.table_of_slot = torch.zeros(capacity, dtype=torch.long, **to)

        # Knob vectors: edited on the host when slots change, copied to the device at once.
        self.knobs_host = {
            "lr_base": np.zeros(capacity),
            "decay_rate": np.ones(capacity),
            "decay_steps": np.ones(capacity),
            "staircase": np.zeros(capacity, dtype=bool),
            "ema_decay": np.zeros(capacity),
        }
        self.knobs = {name: torch.tensor(v, **to) for name, v in self.knobs_host.items()}
        self.global_step = torch.zeros(capacity, dtype=torch.long, **to)
        self.active = torch.zeros(capacity, dtype=torch.bool, **to)

        # Host mirrors of the slots, as arrays: per-step host work must not grow with K
        self.slots: list[TrialSpec | None] = [None] * capacity
        self.occupied = np.zeros(capacity, dtype=bool)
        self.steps_done = np.zeros(capacity, dtype=np.int64)  # global_step, on the host
        buffer = min(config.buffer_steps, config.steps)
        self.loss_buffer = torch.zeros(capacity, buffer, **to)
        self.lr_buffer = torch.zeros(capacity, buffer, dtype=torch.float64, **to)
        self.buffered = 0
        self.cursor = torch.zeros(1, dtype=torch.long, **to)  # ``buffered``, on the device

    # -- slots ---------------------------------------------------------------------------
    def assign(self, slot: int, spec: TrialSpec) -> None:
        """Fresh weights and shadows (both the initial weights), global step 0."""
        init = self._init_cache.get(spec.init_seed)
        if init is None:
            init = [p.to(self.device) for p in init_parameters(self.shape, spec.init_seed)]
            self._init_cache[spec.init_seed] = init
        with torch.no_grad():
            for p, s, p0 in zip(self.params, self.shadows, init, strict=True):
                p[slot].copy_(p0)
                s[slot].copy_(p0)
        for name in self.knobs_host:
            self.knobs_host[name][slot] = getattr(spec.schedule, name)
        self.slots[slot] = spec
        self.occupied[slot] = True
        self.steps_done[slot] = 0

    def free(self, slot: int) -> None:
        self.slots[slot] = None
        self.occupied[slot] = False

    def shrunk(self) -> _Pack:
        """A pack of just the trials training now, each where it was (weights, shadows, step):
        for a pack's last trials. Taken between reports, when nothing is buffered."""
        assert self.buffered == 0
        live = np.flatnonzero(self.occupied)
        small = _Pack(
            self.shape,
            self.loss,
            self.data,
            self.config,
            len(live),
            self.device,
            cuda_graph=self.cuda_graph,
            like=self,
        )
        index = torch.as_tensor(live, device=self.device)
        pairs = zip(small.params + small.shadows, self.params + self.shadows, strict=True)
        with torch.no_grad():
            for new, old in pairs:
                new.copy_(old.index_select(0, index))
        for name, values in self.knobs_host.items():
            small.knobs_host[name][:] = values[live]
        small.slots = [self.slots[slot] for slot in live]
        small.occupied[:] = True
        small.steps_done[:] = self.steps_done[live]
        return small

    def sync_slots(self) -> None:
        """Copy the slots' knobs, step counters, active flags and batch tables to the device."""
        for name, values in self.knobs_host.items():
            self.knobs[name].copy_(torch.from_numpy(values))
        self.active.copy_(torch.from_numpy(self.occupied))
        self.global_step.copy_(torch.from_numpy(self.steps_done))

        seeds = {spec.data_seed for spec in self.slots if spec is not None}
        for seed in [seed for seed in self._table_row if seed not in seeds]:
            self._free_rows.append(self._table_row.pop(seed))
        new = sorted(seeds - self._table_row.keys())
        if len(new) > len(self._free_rows):
            rows = self.tables.shape[0]
            grown = len(self._table_row) + len(new)  # rows never outnumber the slots
            self.tables = torch.cat(
                [self.tables, self.tables.new_zeros(grown - rows, *self.tables.shape[1:])]
            )
            self._free_rows += range(rows, grown)
            self._graph = None  # it reads the old tables: captured again at the next step
        c = self.config
        for seed in new:
            row = self._free_rows.pop()
            self.tables[row].copy_(batch_table(len(self.x_train), c.batch_size, c.steps, seed))
            self._table_row[seed] = row
        table_of_slot = [
            self._table_row[spec.data_seed] if spec is not None else 0 for spec in self.slots
        ]
        self.table_of_slot.copy_(torch.tensor(table_of_slot, dtype=torch.long))

    # -- one update of every active slot -------------------------------------------------------
    def step(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        elif self.cuda_graph and self._eager_steps >= GRAPH_WARMUP:
            self._capture()
        else:
            self._eager_step()
        self.buffered += 1
        self.steps_done += self.occupied

    def _update(self) -> None:
        g, k = self.global_step, self.knobs
        # Idle slots (no trial) compute along with the rest but neither move nor log.
        lr = exponential_decay(
            k["lr_base"], k["decay_rate"], g.double(), k["decay_steps"], k["staircase"]
        )
        step_size = torch.where(self.active, lr, 0.0).float().view(-1, 1, 1)
        decay = torch.where(self.active, ema_decay_at(k["ema_decay"], g.double()), 1.0)
        # 1 - d in float64: in float32, 1 - 0.9999 would be off by 1.7e-4 of itself
        keep, take = decay.float().view(-1, 1, 1), (1 - decay).float().view(-1, 1, 1)

        rows = self.tables[self.table_of_slot, g.clamp(max=self.config.steps - 1)]
        losses = self.loss(forward(self.params, self.x_train[rows], self.shape), self.y_train[rows])
        # Each trial's loss depends on its own slice only, so one backward of the sum gives
        # every trial its own gradient.
        grads = torch.autograd.grad(losses.sum(), self.params)

        with torch.no_grad():
            for p, s, grad in zip(self.params, self.shadows, grads, strict=True):
                p.sub_(step_size * grad)
                s.mul_(keep).add_(take * p)
            self.loss_buffer.index_copy_(1, self.cursor, losses.detach().unsqueeze(1))
            self.lr_buffer.index_copy_(1, self.cursor, lr.unsqueeze(1))
            self.cursor.add_(1)
            self.global_step.add_(self.active)

    def _eager_step(self) -> None:
        if self._stream is None:
            self._update()
            return
        # the warm-up runs on the stream that captures (cuBLAS keeps a handle per stream)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            self._update()
        current.wait_stream(self._stream)
        self._eager_steps += 1

    def _capture(self) -> None:
        """Record one step as a CUDA graph, then replay it for this step and the next ones.
        Recording runs nothing, so a capture that fails leaves the slots as they were: the
        pack then trains without a graph."""
        current = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                self._update()
        except Exception as exc:
            # a capture that fails inside exits without restoring the stream it switched to
            torch.cuda.set_stream(current)
            cause = exc.__context__ or exc  # the op that broke the capture, if there was one
            _capture_failures.append(f"{type(cause).__name__}: {cause}")
            warnings.warn(
                f"could not capture the training step as a CUDA graph ({_capture_failures[-1]}); "
                "training without it (HPO_CUDA_GRAPHS=false skips the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.cuda_graph, self._stream = False, None
            self._update()
            return
        self._graph = graph
        graph.replay()

    def steps_to_report(self) -> int:
        """Steps until some trial is due for an evaluation, or the buffer is full: nothing
        reaches the host before then, so the host only queues steps."""
        c, done = self.config, self.steps_done[self.occupied]
        to_evaluation = np.minimum(c.eval_every - done % c.eval_every, c.steps - done)
        return int(min(to_evaluation.min(), self.loss_buffer.shape[1] - self.buffered))

    def due(self) -> list[int]:
        """The slots whose trial is due for an evaluation now."""
        c, done = self.config, self.steps_done
        hit = self.occupied & ((done % c.eval_every == 0) | (done == c.steps))
        return np.flatnonzero(hit).tolist()

    # -- reading results -----------------------------------------------------------------
    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """The buffered losses and lrs on the host; this is where the host waits for the device."""
        n, self.buffered = self.buffered, 0
        self.cursor.zero_()
        return self.loss_buffer[:, :n].cpu().numpy(), self.lr_buffer[:, :n].cpu().numpy()

    @torch.no_grad()
    def evaluate(self, slots: Sequence[int]) -> dict[int, dict[str, float]]:
        """Validation metrics of the raw weights and of the EMA (shadow) weights of ``slots``.
        Only those are evaluated: slots refilled at other steps fall due at other times, and an
        evaluation over the validation set costs many training steps."""
        index = None
        if len(slots) < self.capacity:
            index = torch.tensor(slots, dtype=torch.long, device=self.x_val.device)
        metrics: dict[str, torch.Tensor] = {}
        for prefix, weights in (("", self.params), ("ema_", self.shadows)):
            if index is not None:
                weights = [w.index_select(0, index) for w in weights]
            out = forward(weights, self.x_val, self.shape)
            metrics[f"{prefix}val_loss"] = self.loss(out, self.y_val)
            if self.labels_val is not None:
                predicted = out.argmax(-1) if out.shape[-1] > 1 else (out[..., 0] > 0.5).long()
                correct = (predicted == self.labels_val).float().mean(1)
                metrics[f"{prefix}val_accuracy"] = correct
        host = {name: values.cpu().numpy() for name, values in metrics.items()}
        rows = range(len(slots)) if index is not None else slots
        return {
            slot: {name: float(v[row]) for name, v in host.items()}
            for slot, row in zip(slots, rows, strict=True)
        }


def train(
    shape: NetworkShape,
    loss: Loss,
    data: TrainingData,
    config: TrainingConfig,
    hooks: PackHooks,
    *,
    pack_size: int = 1,
    device: torch.device | str = "cpu",
    cuda_graph: bool = True,
) -> None:
    """Train the trials that ``hooks.next_trial()`` hands out, ``pack_size`` at a time; on
    CUDA, with the step replayed as a CUDA graph unless ``cuda_graph`` is False."""
    device = torch.device(device)
    pack = _Pack(shape, loss, data, config, pack_size, device, cuda_graph=cuda_graph)
    for slot in range(pack_size):
        spec = hooks.next_trial()
        if spec is None:
            break
        pack.assign(slot, spec)
    pack.sync_slots()

    while pack.occupied.any():
        for _ in range(pack.steps_to_report()):
            pack.step()
        ended = _report(pack, hooks, pack.due(), config)
        exhausted = False  # no trial is left to start
        for slot in ended:
            next_spec = hooks.next_trial()
            pack.free(slot)
            if next_spec is not None:
                pack.assign(slot, next_spec)
            exhausted = next_spec is None
        if ended:
            training = int(pack.occupied.sum())
            if exhausted and 0 < training * SHRINK <= pack.capacity:
                pack = pack.shrunk()
            pack.sync_slots()


def _report(pack: _Pack, hooks: PackHooks, due: Sequence[int], config: TrainingConfig) -> list[int]:
    """Send buffered curve points and due evaluations to the hooks; return the slots that ended."""
    outcomes: dict[int, TrialOutcome] = {}
    try:
        _decide(pack, hooks, due, config, outcomes)
    finally:
        # also when a hook stopped the run (Ctrl-C): the trials that ended before it are told,
        # so their results are kept instead of being failed and trained again
        for outcome in outcomes.values():
            hooks.on_trial_end(outcome)
    return list(outcomes)


def _decide(
    pack: _Pack,
    hooks: PackHooks,
    due: Sequence[int],
    config: TrainingConfig,
    outcomes: dict[int, TrialOutcome],
) -> None:
    """Hand the hooks the curve points and evaluations; fill ``outcomes`` with the slots whose
    trials end here."""
    n = pack.buffered
    losses, lrs = pack.drain()
    for slot, spec in enumerate(pack.slots):
        if spec is None:
            continue
        last = int(pack.steps_done[slot])
        steps = np.arange(last - n, last)
        slot_losses, slot_lrs = losses[slot], lrs[slot]
        finite = np.isfinite(slot_losses)
        # every log_every-th update, and the last one, so that a finished trial's curve ends
        # where it did (a pruned trial's ends at its last log_every-th update)
        keep = (steps % config.log_every == 0) | (steps == config.steps - 1)
        if not finite.all():
            bad = int(np.argmin(finite))
            keep[bad:] = False
            outcomes[slot] = TrialOutcome(
                spec.key,
                "diverged",
                int(steps[bad]),
                reason=f"train_loss became {slot_losses[bad]} at step {steps[bad]}",
            )
        if keep.any():
            hooks.on_curve(spec.key, steps[keep], slot_losses[keep], slot_lrs[keep])

    due = [slot for slot in due if slot not in outcomes]
    if due:
        evaluations = pack.evaluate(due)
        for slot in due:
            spec = pack.slots[slot]
            assert spec is not None
            step, metrics = int(pack.steps_done[slot]), evaluations[slot]
            bad = [name for name, value in metrics.items() if not np.isfinite(value)]
            if bad:
                reason = f"{bad[0]} became {metrics[bad[0]]} at step {step}"
                outcomes[slot] = TrialOutcome(spec.key, "diverged", step, metrics, reason=reason)
                continue
            try:
                hooks.on_evaluation(spec.key, step, metrics)
            except Exception as error:
                outcomes[slot] = TrialOutcome(
                    spec.key, "stopped", step, metrics, reason=str(error), error=error
                )
                continue
            if step == config.steps:
                outcomes[slot] = TrialOutcome(
                    spec.key,
                    "complete",
                    step,
                    metrics,
                    parameters=[p[slot].detach().cpu().numpy() for p in pack.params],
                    ema_parameters=[s[slot].cpu().numpy() for s in pack.shadows],
                )


@dataclass
class Curves:
    """Everything one trial reported, collected by :func:`train_trials`."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    evaluations: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    outcome: TrialOutcome | None = None


class _Collector:
    def __init__(self, specs: Sequence[TrialSpec]) -> None:
        self.queue = list(specs)
        self.curves = {spec.key: Curves() for spec in specs}

    def next_trial(self) -> TrialSpec | None:
        return self.queue.pop(0) if self.queue else None

    def on_curve(self, key, steps, train_loss, lr) -> None:
        c = self.curves[key]
        c.steps += steps.tolist()
        c.train_loss += train_loss.tolist()
        c.lr += lr.tolist()

    def on_evaluation(self, key, step, metrics) -> None:
        self.curves[key].evaluations.append((step, metrics))

    def on_trial_end(self, outcome: TrialOutcome) -> None:
        self.curves[outcome.key].outcome = outcome


def train_trials(
    shape: NetworkShape,
    loss: Loss,
    data: TrainingData,
    config: TrainingConfig,
    specs: Sequence[TrialSpec],
    *,
    pack_size: int | None = None,
    device: torch.device | str = "cpu",
    cuda_graph: bool = True,
) -> list[Curves]:
    """Train ``specs`` (all in one pack by default) and return each trial's curves, in order."""
    collector = _Collector(specs)
    train(
        shape,
        loss,
        data,
        config,
        collector,
        pack_size=pack_size or len(specs),
        device=device,
        cuda_graph=cuda_graph,
    )
    return [collector.curves[spec.key] for spec in specs]
