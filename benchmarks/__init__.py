"""The benchmarks of the attnlens repository, one module each; run from the repository root as
``python -m benchmarks.NAME`` (e.g. ``python -m benchmarks.shapes_quality --help``). Each writes its record
to ``benchmarks/results/``; tests import them as modules (``from benchmarks import shapes_conditioning``).
They are repository tooling, not part of the ``attnlens`` package or its wheel."""
