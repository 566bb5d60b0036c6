"""The `lamc` program's entry point, kept free of heavy imports: a stage server
(`lamc serve OUT --stage K ...`) begins building its stage's session before the rest of
lamc is imported (`lamc.runtime.early`), and checks the artifact before the command-line
library is imported (`lamc.runtime.loading.begin_early`); with LAMC_AGENT set, it is
started by a `lamc agent` that has imported everything already (`lamc.cli.handover`)."""

from __future__ import annotations

import sys


def main(handover: bool = True) -> None:
    """`handover`: with LAMC_AGENT set, a stage server's start goes to that `lamc agent`
    (`lamc.cli.handover`), and this process stands in for the server it starts."""
    if sys.argv[1:2] == ["serve"]:
        if handover:
            import os

            from lamc.cli import handover as agent

            path = os.environ.get(agent.ENV)
            if path and agent.wants_agent(sys.argv[1:]):
                code = agent.hand_over(path, sys.argv[1:])
                if code is not None:
                    sys.exit(code)
        from lamc.runtime import early

        early.begin(sys.argv[2:])
        from lamc.runtime.loading import begin_early

        begin_early(sys.argv[2:])
    from lamc.cli.main import main as run

    run()
