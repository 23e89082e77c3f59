"""Experiments: the best configs across every study of one experiment file."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path

from service.api import queries
from service.api.convert import best_out
from service.api.deps import SessionDep, SettingsDep, no_query_parameters
from service.api.schemas import ErrorOut, ExperimentBestOut

router = APIRouter(prefix="/experiments", tags=["experiments"])


@router.get(
    "/{experiment}/best",
    response_model=ExperimentBestOut,
    responses={
        404: {
            "model": ErrorOut,
            "description": "no study of this experiment, or none with a completed trial yet",
        },
        422: {"model": ErrorOut, "description": "invalid parameters"},
    },
    dependencies=[Depends(no_query_parameters)],
    summary="The best config of each study of an experiment, best first",
)
def experiment_best(
    experiment: Annotated[str, Path(description="the experiment's name")],
    session: SessionDep,
    settings: SettingsDep,
) -> ExperimentBestOut:
    studies = queries.studies_of_experiment(session, experiment)
    if not studies:
        raise HTTPException(status_code=404, detail=f"no study of experiment {experiment!r}")
    base = settings.ui_base_url
    bests = []
    for study in studies:
        trial = queries.best_trial(session, study.id)
        if trial is not None:
            bests.append(best_out(base, study, trial))
    if not bests:
        raise HTTPException(
            status_code=404,
            detail=f"no study of experiment {experiment!r} has a completed trial yet "
            f"(studies: {', '.join(s.name for s in studies)})",
        )
    bests.sort(key=lambda b: (b.value, b.study))
    return ExperimentBestOut(experiment=experiment, best=bests[0], studies=bests)
