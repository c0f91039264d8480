"""medrec's benchmark scripts and the analysis code they share.

Every script runs as ``python benchmarks/<script>.py ...`` from the repository root; shared code
is imported as ``benchmarks.<module>`` (each script puts the repository root on ``sys.path``
once, so this checkout's code is measured, not an installed copy):

* :mod:`benchmarks.run` trains, tests and measures one configuration (one ``results.json``);
* :mod:`benchmarks.grid` runs ``run.py`` over configs × seeds × overrides, one folder per cell,
  resumable, and aggregates mean ± std over seeds;
* :mod:`benchmarks.provenance` writes the header every report starts with (command, commit,
  config hash).
"""
