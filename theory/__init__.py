"""Runnable studies on exact tabular dynamics: ``python -m theory`` (see ``--help``)."""
