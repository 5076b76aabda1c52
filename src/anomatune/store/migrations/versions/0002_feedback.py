"""The feedback table: the operators' verdicts, read by anomatune update --feedback.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("station", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.String(64)),
        sa.Column("model_id", sa.String(400)),
        sa.Column("part", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("file_name", sa.String(1024)),
        sa.Column("inspection_id", sa.String(32)),
        sa.Column("score", sa.Float),
        sa.Column("normalized", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("decision", sa.String(16)),
        sa.Column("image", sa.Text),
        sa.Column("mask", sa.Text),
    )
    op.create_index("ix_feedback_model_time", "feedback", ["model", "time"])


def downgrade() -> None:
    op.drop_table("feedback")
