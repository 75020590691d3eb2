"""``python -m cdr_local`` = ``cdr``."""

from .cli import main

main()
