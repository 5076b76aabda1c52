"""Alembic's environment: the store runs the migrations on its own connection (see InspectionStore.migrate)."""

from alembic import context

from anomatune.store.tables import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
