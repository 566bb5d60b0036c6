"""Each test file's seconds in a pytest JUnit report, as tests/durations.json wants them:
`pytest --junitxml=junit.xml ...; python scripts/test_durations.py junit.xml >
tests/durations.json`. tests/conftest.py hands the longest files out first."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/test_durations.py JUNIT.xml")
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(sys.argv[1]).iter("testcase"):
        # classname is the module's dotted path (and a class's name, if any)
        parts = case.get("classname", "").split(".")
        while parts and not parts[-1].startswith("test_"):
            parts.pop()
        if not parts:
            continue
        seconds["/".join(parts) + ".py"] += float(case.get("time", 0.0))
    ordered = dict(sorted(seconds.items(), key=lambda kv: -kv[1]))
    json.dump({k: round(v, 1) for k, v in ordered.items()}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
