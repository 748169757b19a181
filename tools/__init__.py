"""Development tools of the attnlens repository (not part of the ``attnlens`` package or its wheel).

Run them from the repository root, e.g. ``python -m tools.shapes_model.train --help``. They may import
``attnlens``; nothing in ``attnlens`` imports them (``tests/test_layout.py`` checks both).
"""
