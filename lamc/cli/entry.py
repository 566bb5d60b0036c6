"""The `lamc` program's entry point, kept free of heavy imports: a stage server
(`lamc serve OUT --stage K ...`) begins building its stage's session before the rest of
lamc is imported (`lamc.runtime.early`), and checks the artifact before the command-line
library is imported (`lamc.runtime.loading.begin_early`)."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        from lamc.runtime import early

        early.begin(sys.argv[2:])
        from lamc.runtime.loading import begin_early

        begin_early(sys.argv[2:])
    from lamc.cli.main import main as run

    run()
