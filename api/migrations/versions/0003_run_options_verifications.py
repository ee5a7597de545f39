"""Runs keep their options and attempts (elastic runs, Hugging Face init, data); verifications.

`runs.options` holds what the run body asked for beyond candidate/steps/backend (`save_every`,
`on_failure`, `min_nodes`, `init_hf`, `data`, ...); `runs.attempts` the list of attempts of an
elastic run. `verifications` are measured re-rankings of a plan's top candidates.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("options", sa.JSON, nullable=True))
        batch.add_column(sa.Column("attempts", sa.JSON, nullable=True))
    op.create_table(
        "verifications",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("plan_id", sa.String(32), sa.ForeignKey("plans.id"), index=True),
        sa.Column("status", sa.String(16), index=True),
        sa.Column("request", sa.JSON, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("verifications")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("attempts")
        batch.drop_column("options")
