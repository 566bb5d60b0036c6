"""The `lamc` program's entry point, kept free of heavy imports: a stage server
(`lamc serve OUT --stage K ...`) begins checking and loading its stage before the command
line library is even imported (see `lamc.runtime.loading.begin_early`)."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        from lamc.runtime.loading import begin_early

        begin_early(sys.argv[2:])
    from lamc.cli.main import main as run

    run()
