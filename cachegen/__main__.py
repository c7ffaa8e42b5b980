"""`python -m cachegen` runs the CLI."""

from cachegen.cli import main

main()
