"""``anomatune serve``: runs over HTTP (FastAPI + uvicorn), with a page for the operator.

FastAPI, uvicorn and the engines are optional extras (``pip install 'anomatune[serve]'``):
nothing here imports them at module level.
"""
