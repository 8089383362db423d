"""The study: sweeps over methods and precisions, a results store, reports and plots.

* :mod:`.recipe` -- YAML recipes and ``--grid`` expanded into canonical run dicts;
* :mod:`.store` -- the SQLite results store (atomic claims, resume);
* :mod:`.runner` -- workers (one model session per model, heartbeats, ``--workers N``);
* :mod:`.ray_executor` -- ``--executor ray``: the runs on Ray actors, the store stays with the driver;
* :mod:`.report` / :mod:`.plots` -- tables, sensitivity classes, recommendations, figures;
* :mod:`.sensitivity` -- RTN on one module type / block / layer at a time.

See README.md in this folder for the commands.
"""
