"""Scaling out on Ray: batch scoring in an actor pool, one task per category.

Ray is an optional extra (``pip install 'anomatune[ray]'``): nothing here imports it at
module level, and the commands import these modules only with ``--engine ray``.
"""
