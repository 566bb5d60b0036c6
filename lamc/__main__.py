"""`python -m lamc`: the same as the `lamc` command."""

from lamc.cli.entry import main

main()
