"""``python -m middleware`` runs the command line."""

from middleware.cli import main

main()
