"""A running trial's small writes (its params, reports, and user and system attributes), held
and then written together: Optuna commits each one alone, and a trial makes about twenty of
them."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import optuna
import sqlalchemy
from optuna import distributions
from optuna.storages._rdb import models as _models  # Optuna's tables, written as Optuna does

from service.db.engine import UPSERTS

__all__ = ["DeferredWrites", "upsert"]

log = logging.getLogger(__name__)


@dataclass
class _TrialWrites:
    params: dict[str, tuple[float, str]] = field(default_factory=dict)  # internal value, dist
    values: dict[int, float] = field(default_factory=dict)  # step -> intermediate value
    user_attrs: dict[str, str] = field(default_factory=dict)  # key -> JSON
    system_attrs: dict[str, str] = field(default_factory=dict)  # key -> JSON

    def update(self, newer: _TrialWrites) -> None:
        self.params.update(newer.params)
        self.values.update(newer.values)
        self.user_attrs.update(newer.user_attrs)
        self.system_attrs.update(newer.system_attrs)


class DeferredWrites:
    """The writes one storage holds. Each is keyed (a trial's param, step or attribute), and a
    later write of a key replaces an earlier one, as Optuna's own writes of it do, so the
    order in which they are written does not matter.

    The storage writes them (:meth:`write`) before any other call of its, from any thread, so
    its own reads, its state changes and other workers' views keep their order, and at the
    latest ``delay`` seconds after the first is held. Holding and writing take one lock, so a
    write under way is never overtaken."""

    def __init__(self, *, delay: float) -> None:
        self.delay = delay
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)  # a writer thread waits on it for ``due``
        self.due: float | None = None  # by when (time.monotonic) what is held must be written
        self.writer: threading.Thread | None = None  # the storage's, to write them by ``due``
        self._pending: dict[int, _TrialWrites] = {}
        self._finished: set[int] = set()  # trials found finished (or gone) by a write

    def __bool__(self) -> bool:
        return bool(self._pending)

    def hold_param(
        self,
        trial_id: int,
        name: str,
        value: float,
        distribution: distributions.BaseDistribution,
        previous: distributions.BaseDistribution,
    ) -> None:
        # the check Optuna makes before its write, made now so a mismatch is raised here
        distributions.check_distribution_compatibility(previous, distribution)
        dist = distributions.distribution_to_json(distribution)
        self._hold(trial_id).params[name] = (value, dist)

    def hold_value(self, trial_id: int, step: int, value: float) -> None:
        self._hold(trial_id).values[step] = value

    def hold_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._hold(trial_id).user_attrs[key] = json.dumps(value)  # unserialisable: raised here

    def hold_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._hold(trial_id).system_attrs[key] = json.dumps(value)

    def finished(self, trial_id: int) -> None:
        """The storage finished the trial: its later writes are refused."""
        self._finished.add(trial_id)

    def _hold(self, trial_id: int) -> _TrialWrites:
        if trial_id in self._finished:
            # what Optuna's write would say; known since a write of ours found it finished
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"trial id {trial_id} has already finished and can not be updated"
            )
        return self._pending.setdefault(trial_id, _TrialWrites())

    def take(self) -> dict[int, _TrialWrites]:
        """What is held; held no more."""
        pending, self._pending = self._pending, {}
        return pending

    def put_back(self, pending: dict[int, _TrialWrites]) -> None:
        """Hold again what a write could not write (:meth:`take`'s), under what was held
        since, which is newer."""
        for trial_id, newer in self._pending.items():
            pending.setdefault(trial_id, _TrialWrites()).update(newer)
        self._pending = pending

    def write(self, session: sqlalchemy.orm.Session, pending: dict[int, _TrialWrites]) -> None:
        """Write ``pending`` in ``session`` (one transaction): one statement per table. Writes
        of a trial that has finished (another worker's reaper failed it, say) are dropped, as
        Optuna refuses them, and so are that trial's later ones (:meth:`hold_value` raises)."""
        trial = _models.TrialModel
        states = dict(
            session.execute(
                sqlalchemy.select(trial.trial_id, trial.state).where(
                    trial.trial_id.in_(sorted(pending))
                )
            ).all()
        )
        live = {}
        for trial_id, writes in pending.items():
            state = states.get(trial_id)
            if state is None or state.is_finished():
                log.info("dropped the writes of trial id %d: it has finished", trial_id)
                self._finished.add(trial_id)
            else:
                live[trial_id] = writes
        value_model = _models.TrialIntermediateValueModel
        values = []
        for trial_id, writes in live.items():
            for step, value in writes.values.items():
                stored, kind = value_model.intermediate_value_to_stored_repr(value)
                values.append(
                    {
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": stored,
                        "intermediate_value_type": kind,
                    }
                )
        params = [
            {
                "trial_id": trial_id,
                "param_name": name,
                "param_value": value,
                "distribution_json": dist,
            }
            for trial_id, writes in live.items()
            for name, (value, dist) in writes.params.items()
        ]
        attrs, system_attrs = (
            [
                {"trial_id": trial_id, "key": key, "value_json": value}
                for trial_id, writes in live.items()
                for key, value in getattr(writes, kind).items()
            ]
            for kind in ("user_attrs", "system_attrs")
        )
        # upserts: a try after one whose answer was lost writes the same rows again
        upsert(session, _models.TrialParamModel, params, keys=("trial_id", "param_name"))
        upsert(session, value_model, values, keys=("trial_id", "step"))
        upsert(session, _models.TrialUserAttributeModel, attrs, keys=("trial_id", "key"))
        upsert(session, _models.TrialSystemAttributeModel, system_attrs, keys=("trial_id", "key"))


def upsert(
    session: sqlalchemy.orm.Session,
    model: type,
    rows: list[dict[str, Any]],
    *,
    keys: tuple[str, ...],
) -> None:
    """Insert ``rows`` of ``model`` in one statement; a row whose ``keys`` exist updates it.
    For the dialects of :data:`~service.db.engine.UPSERTS`."""
    if not rows:
        return
    statement = UPSERTS[session.get_bind().dialect.name](model)
    changed = {c: statement.excluded[c] for c in rows[0] if c not in keys}
    session.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=changed), rows)
