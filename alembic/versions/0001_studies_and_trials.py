"""Studies and trials: the registry of studies and one typed row per trial.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("experiment_name", sa.String(length=512), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("experiment_text", sa.Text(), nullable=True),
        sa.Column("mlflow_experiment_id", sa.String(length=64), nullable=True),
        sa.Column("mlflow_parent_run_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("name", name=op.f("uq_studies_name")),
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_studies_experiment_name"), ["experiment_name"], unique=False
        )

    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("lr_base", sa.Float(), nullable=True),
        sa.Column("decay_rate", sa.Float(), nullable=True),
        sa.Column("decay_steps", sa.Integer(), nullable=True),
        sa.Column("staircase", sa.Boolean(), nullable=True),
        sa.Column("ema_decay", sa.Float(), nullable=True),
        sa.Column("val_loss", sa.Float(), nullable=True),
        sa.Column("ema_val_loss", sa.Float(), nullable=True),
        sa.Column("val_accuracy", sa.Float(), nullable=True),
        sa.Column("ema_val_accuracy", sa.Float(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("fail_reason", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_trials_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trials")),
        sa.UniqueConstraint("study_id", "number", name="uq_trials_study_id_number"),
    )
    with op.batch_alter_table("trials", schema=None) as batch_op:
        batch_op.create_index(
            "ix_trials_filters",
            ["study_id", "state", "staircase", "lr_base", "decay_rate", "decay_steps", "ema_decay"],
            unique=False,
        )
        batch_op.create_index(
            "ix_trials_study_ema_val_accuracy",
            ["study_id", "ema_val_accuracy", "number"],
            unique=False,
        )
        batch_op.create_index(
            "ix_trials_study_ema_val_loss", ["study_id", "ema_val_loss", "number"], unique=False
        )
        batch_op.create_index(
            "ix_trials_study_state_value", ["study_id", "state", "value", "number"], unique=False
        )
        batch_op.create_index(
            "ix_trials_study_val_accuracy", ["study_id", "val_accuracy", "number"], unique=False
        )
        batch_op.create_index(
            "ix_trials_study_val_loss", ["study_id", "val_loss", "number"], unique=False
        )
        batch_op.create_index(
            "ix_trials_study_value", ["study_id", "value", "number"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("trials", schema=None) as batch_op:
        batch_op.drop_index("ix_trials_study_value")
        batch_op.drop_index("ix_trials_study_val_loss")
        batch_op.drop_index("ix_trials_study_val_accuracy")
        batch_op.drop_index("ix_trials_study_state_value")
        batch_op.drop_index("ix_trials_study_ema_val_loss")
        batch_op.drop_index("ix_trials_study_ema_val_accuracy")
        batch_op.drop_index("ix_trials_filters")

    op.drop_table("trials")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_experiment_name"))

    op.drop_table("studies")
