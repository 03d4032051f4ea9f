"""`python -m ocs` runs the CLI."""

from ocs.cli import app

app(prog_name="ocs")
