"""Optuna's trials read from its tables with SQLAlchemy Core, and built by Optuna itself.

Optuna's RDB storage loads a trial and its five kinds of rows (params, values, user and system
attributes, reports) as ORM objects, then builds a ``FrozenTrial`` from them. On the handful of
running trials that every ask re-reads, and on the trial its tell checks, that loading costs
more than the rows: ORM objects, their identity map and their collections (8–12 ms for the 9
trials of a pack's claim, against 4–5 ms here, on the 2-core VM of docs/benchmarks.md). Here
the same rows come back as plain result rows, with the columns' own types (a state as
``TrialState``, a datetime as the database gives it), grouped per trial in objects that carry
the ORM's attribute names, and the storage's own ``_build_frozen_trial_from_trial_model``
(Optuna's; its datetime conversion included, through ``TrialModel``'s properties) turns each
into the ``FrozenTrial`` Optuna would return, its mappings in the order Optuna's reads give
them on SQLite. This leans on Optuna's private tables and build (pyproject pins Optuna 5);
a build that reads something more fails loudly (an ``AttributeError``), and the tests compare
every field, and its order, with Optuna's own reads."""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.orm
from optuna.storages._rdb import models as _models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

__all__ = ["read_trial", "read_trials"]

# the ids one statement lists at most: as Optuna's ORM loads (SQLAlchemy's "selectin" loading
# takes 500 at a time), far below any database's limit
_CHUNK = 500
_TRIALS = _models.TrialModel.__table__
if not isinstance(vars(_models.TrialModel).get("datetime_start"), property):
    # Optuna 5 stores naive UTC and converts it in these properties, which are reused below
    raise ImportError(f"service.trial_reads needs Optuna 5 (found {optuna.__version__})")


def _chunk_of(model: Any, *order: str) -> sqlalchemy.Select:
    """The statement that reads the rows of ``model`` of a chunk of trials (bound as
    ``ids``), per trial in the order of ``order``: the order of the unique index that
    SQLite reads Optuna's own (unordered) query through. On PostgreSQL Optuna's order
    depends on the query plan; these reads give SQLite's there too."""
    table = model.__table__
    return (
        sqlalchemy.select(table)
        .where(table.c.trial_id.in_(sqlalchemy.bindparam("ids", expanding=True)))
        .order_by(table.c.trial_id, *(table.c[name] for name in order))
    )


# the relationship of TrialModel each table fills (their rows' columns carry the ORM's names)
_CHILDREN = {
    "params": _chunk_of(_models.TrialParamModel, "param_id"),  # (Optuna's build sorts them)
    "values": _chunk_of(_models.TrialValueModel, "objective"),
    "user_attributes": _chunk_of(_models.TrialUserAttributeModel, "key"),
    "system_attributes": _chunk_of(_models.TrialSystemAttributeModel, "key"),
    "intermediate_values": _chunk_of(_models.TrialIntermediateValueModel, "step"),
}


class _Trial:
    """A trial's row and its rows of each kind, read as ``TrialModel`` reads them: the
    datetimes through its own properties (stored as naive UTC, given in local time)."""

    datetime_start = vars(_models.TrialModel)["datetime_start"]
    datetime_complete = vars(_models.TrialModel)["datetime_complete"]

    def __init__(self, row: Any) -> None:
        self.trial_id: int = row.trial_id
        self.number: int = row.number
        self.state: TrialState = row.state
        self._datetime_start_utc = row.datetime_start
        self._datetime_complete_utc = row.datetime_complete
        self.params: list[Any] = []
        self.values: list[Any] = []
        self.user_attributes: list[Any] = []
        self.system_attributes: list[Any] = []
        self.intermediate_values: list[Any] = []


def read_trials(
    storage: optuna.storages.RDBStorage,
    study_id: int,
    *,
    states: Container[TrialState] | None = None,
    included: Iterable[int] = (),
    greater_than: int = -1,
) -> list[FrozenTrial]:
    """The study's trials (in ``states``, when given) with an id in ``included`` or above
    ``greater_than`` (all of them when ``greater_than`` is -1), by id: what Optuna's
    ``RDBStorage._get_trials`` returns for the same arguments. ``KeyError`` when the study
    does not exist, as Optuna's."""
    # as Optuna's: an included id above the bound is read through the bound
    wanted = {i for i in included if i <= greater_than}
    many = len(wanted) > _CHUNK
    condition = _TRIALS.c.study_id == study_id
    if states is not None:
        assert isinstance(states, Iterable)  # as Optuna's: a Container to the type checker
        condition &= _TRIALS.c.state.in_(list(states))
    if greater_than > -1:
        above = _TRIALS.c.trial_id > greater_than
        if many:  # from the first of them (the rest is dropped below), so no statement lists them
            condition &= _TRIALS.c.trial_id >= min(wanted)
        elif wanted:
            condition &= sqlalchemy.or_(_TRIALS.c.trial_id.in_(sorted(wanted)), above)
        else:
            condition &= above
    query = sqlalchemy.select(_TRIALS).where(condition).order_by(_TRIALS.c.trial_id)
    with _create_scoped_session(storage.scoped_session) as session:
        rows = session.execute(query).all()
        if many:
            rows = [row for row in rows if row.trial_id > greater_than or row.trial_id in wanted]
        trials = _built(storage, session, rows)
        if not trials:  # none found: Optuna says so when the study itself is missing
            _models.StudyModel.find_or_raise_by_id(study_id, session)
    return trials


def read_trial(storage: optuna.storages.RDBStorage, trial_id: int) -> FrozenTrial:
    """The trial, as Optuna's ``RDBStorage.get_trial`` returns it (``KeyError`` when there
    is none)."""
    query = sqlalchemy.select(_TRIALS).where(_TRIALS.c.trial_id == trial_id)
    with _create_scoped_session(storage.scoped_session) as session:
        row = session.execute(query).first()
        if row is None:
            raise KeyError(_models.NOT_FOUND_MSG)
        return _built(storage, session, [row])[0]


def _built(
    storage: optuna.storages.RDBStorage, session: sqlalchemy.orm.Session, rows: list[Any]
) -> list[FrozenTrial]:
    trials = {row.trial_id: _Trial(row) for row in rows}
    ids = list(trials)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        for kind, statement in _CHILDREN.items():
            for child in session.execute(statement, {"ids": chunk}):
                getattr(trials[child.trial_id], kind).append(child)
    return [storage._build_frozen_trial_from_trial_model(trial) for trial in trials.values()]  # type: ignore[arg-type]
