"""Every inspection kept, in a real database: SQLite beside the model by default, PostgreSQL through a URL."""

from .inspections import InspectionStore, store_url
from .settings import StoreSettings
from .tables import Inspection

__all__ = ["Inspection", "InspectionStore", "StoreSettings", "store_url"]
