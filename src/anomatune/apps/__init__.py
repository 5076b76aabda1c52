"""The command line (``cli``, ``options``), the jobs runner (one command per category, ``jobs``) and the demo."""
