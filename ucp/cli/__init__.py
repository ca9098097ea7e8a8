"""The ``ucp`` command: thin argument parsing over the library."""
