"""`python -m lamc`: the same as the `lamc` command."""

from lamc.cli.main import main

main()
