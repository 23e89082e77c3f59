"""Studies: list, detail, best config, and trials (top-k with typed filters)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query

from service.api import queries
from service.api.convert import best_out, study_out, trial_out
from service.api.deps import SessionDep, SettingsDep, no_query_parameters
from service.api.schemas import BestOut, ErrorOut, StudyDetail, StudyList, TrialOut, TrialPage
from service.db.models import StudyRow

router = APIRouter(prefix="/studies", tags=["studies"])

StudyName = Annotated[str, Path(description="the study's name")]
NOT_FOUND = {404: {"model": ErrorOut, "description": "no such study or trial"}}
INVALID = {422: {"model": ErrorOut, "description": "invalid parameters"}}
NO_QUERY = [Depends(no_query_parameters)]


def _study(session, name: str) -> StudyRow:
    study = queries.find_study(session, name)
    if study is None:
        raise HTTPException(status_code=404, detail=f"no study named {name!r}")
    return study


@router.get(
    "",
    response_model=StudyList,
    responses=INVALID,
    dependencies=NO_QUERY,
    summary="Every study, with trial counts and best value",
)
def list_studies(session: SessionDep, settings: SettingsDep) -> StudyList:
    studies = queries.all_studies(session)
    counts = queries.state_counts(session, [s.id for s in studies])
    base = settings.ui_base_url
    return StudyList(
        items=[study_out(base, s, counts[s.id], queries.best_trial(session, s.id)) for s in studies]
    )


@router.get(
    "/{study}",
    response_model=StudyDetail,
    responses={**NOT_FOUND, **INVALID},
    dependencies=NO_QUERY,
    summary="One study with its experiment",
)
def get_study(study: StudyName, session: SessionDep, settings: SettingsDep) -> StudyDetail:
    row = _study(session, study)
    counts = queries.state_counts(session, [row.id])[row.id]
    best = queries.best_trial(session, row.id)
    return study_out(settings.ui_base_url, row, counts, best, model=StudyDetail)


@router.get(
    "/{study}/best",
    response_model=BestOut,
    responses={
        404: {"model": ErrorOut, "description": "no such study, or no trial finished yet"},
        **INVALID,
    },
    dependencies=NO_QUERY,
    summary="The best config of a study",
)
def get_best(study: StudyName, session: SessionDep, settings: SettingsDep) -> BestOut:
    row = _study(session, study)
    best = queries.best_trial(session, row.id)
    if best is None:
        counts = queries.state_counts(session, [row.id])[row.id]
        seen = ", ".join(f"{n} {state.lower()}" for state, n in counts.items() if n)
        raise HTTPException(
            status_code=404,
            detail=f"study {study!r} has no completed trial yet ({seen or 'no trials'})",
        )
    return best_out(settings.ui_base_url, row, best)


@router.get(
    "/{study}/trials",
    response_model=TrialPage,
    responses={**NOT_FOUND, **INVALID},
    summary="Trials, best first, with typed filters",
)
def get_trials(
    study: StudyName,
    query: Annotated[queries.TrialQuery, Query()],
    session: SessionDep,
    settings: SettingsDep,
) -> TrialPage:
    row = _study(session, study)
    total, trials = queries.list_trials(session, row.id, query)
    return TrialPage(
        total=total,
        limit=query.limit,
        offset=query.offset,
        order_by=query.order_by,
        direction=query.sort_direction,
        items=[trial_out(settings.ui_base_url, row, t) for t in trials],
    )


@router.get(
    "/{study}/trials/{number}",
    response_model=TrialOut,
    responses={**NOT_FOUND, **INVALID},
    dependencies=NO_QUERY,
    summary="One trial",
)
def get_trial(
    study: StudyName,
    number: Annotated[int, Path(ge=0, le=queries.INT32)],
    session: SessionDep,
    settings: SettingsDep,
) -> TrialOut:
    row = _study(session, study)
    trial = queries.get_trial(session, row.id, number)
    if trial is None:
        raise HTTPException(status_code=404, detail=f"study {study!r} has no trial {number}")
    return trial_out(settings.ui_base_url, row, trial)
