"""Evaluating a run on a labelled test split: metrics and figures written to ``evaluation/`` (``evaluate``, ``plots``).

The function is ``anomatune.evaluate`` (here it would be shadowed by its module of the same name).
"""
