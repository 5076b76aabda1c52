"""The inspections table.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("station", sa.String(128), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("source_key", sa.String(300)),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.String(64)),
        sa.Column("model_id", sa.String(400)),
        sa.Column("file_name", sa.String(1024), nullable=False),
        sa.Column("score", sa.Float),
        sa.Column("normalized", sa.Float),
        sa.Column("false_alarm_rate", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("image_path", sa.Text),
        sa.Column("overlay_path", sa.Text),
        sa.Column("operator_verdict", sa.String(16)),
        sa.Column("operator_note", sa.Text),
        sa.Column("operator_time", sa.DateTime(timezone=True)),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("station", "source_key", name="uq_inspections_station_source_key"),
    )
    op.create_index("ix_inspections_time", "inspections", ["time"])
    op.create_index("ix_inspections_unpublished", "inspections", ["published_at", "time"])


def downgrade() -> None:
    op.drop_table("inspections")
