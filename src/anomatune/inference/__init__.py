"""Using a fitted run: scoring image files (``predict``), drawing what a person looks at,
exporting the model (``export``) and the HTML report (``report``).

The functions are ``anomatune.predict``, ``anomatune.export`` and ``anomatune.build_report``
(here they would be shadowed by their modules of the same names).
"""
