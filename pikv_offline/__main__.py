"""`python -m pikv_offline ...` runs the `pikv` command line (also under torchrun -m)."""

from .cli import main

main()
