"""The ``flowmatch`` command line (``flowmatch.cli.main:main``)."""
