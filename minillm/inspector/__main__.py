"""`python -m minillm.inspector`: see cli.py."""

from .cli import run

run()
