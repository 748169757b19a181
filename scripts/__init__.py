"""Repository scripts (not part of the ``attnlens`` package). Most are shell; the Python ones also run as
``python scripts/NAME.py`` and import as modules (``from scripts import check_book``) for the tests."""
