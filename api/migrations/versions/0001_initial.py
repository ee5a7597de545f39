"""Initial schema: plans and runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plans",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("foldplan_version", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=True),
        sa.Column("num_gpus", sa.Integer, nullable=False),
        sa.Column("gpu", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("best_step_time_s", sa.Float, nullable=True),
        sa.Column("best_mfu", sa.Float, nullable=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("answer", sa.JSON, nullable=False),
        sa.Column("constants", sa.JSON, nullable=False),
    )
    op.create_index("ix_plans_created_at", "plans", ["created_at"])
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("plan_id", sa.String(32), sa.ForeignKey("plans.id"), nullable=False),
        sa.Column("candidate", sa.Integer, nullable=False),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.Column("predicted", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("log_tail", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_runs_plan_id", "runs", ["plan_id"])
    op.create_index("ix_runs_status", "runs", ["status"])


def downgrade() -> None:
    op.drop_index("ix_runs_status", "runs")
    op.drop_index("ix_runs_plan_id", "runs")
    op.drop_table("runs")
    op.drop_index("ix_plans_created_at", "plans")
    op.drop_table("plans")
