"""Applications on top of the library: the ``sigma-fast`` command line (``apps.cli``)."""
