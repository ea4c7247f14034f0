"""``ldm serve``: AUTOMATIC1111's HTTP API and the page, above ``pipelines`` (imports ``pipelines``
and ``ldm``; only ``cli.serve`` imports it, lazily). ``app`` routes, ``jobs`` turns requests into
pipeline calls, ``worker`` runs them, ``a1111`` holds A1111's names, ``api_models`` its fields,
``security`` credentials, limits and name lookup."""
