"""Lay out a tree for mypy: `lamc/` as it installs, plus usable TensorRT stubs.

mypy cannot follow setuptools' package-dir mapping through an editable install, so
build/typecheck/lamc/ links lamc/*, passes/, backends/ and models/ the way the wheel
places them. tensorrt-stubs ships its .pyi files without a py.typed marker and with a few
signatures Python cannot parse (a parameter named `in`, a default before a required
parameter, in plugin classes lamc never uses); a repaired copy goes to build/typecheck/stubs.

    python scripts/typecheck_tree.py   (then: cd build/typecheck && MYPYPATH=stubs mypy -p lamc)
"""

from __future__ import annotations

import re
import shutil
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def main() -> None:
    shutil.rmtree(TREE, ignore_errors=True)
    package = TREE / "lamc"
    package.mkdir(parents=True)
    for entry in (ROOT / "lamc").iterdir():
        (package / entry.name).symlink_to(entry)
    for name in ("passes", "backends", "models"):
        (package / name).symlink_to(ROOT / name)
    stubs = TREE / "stubs"
    stubs.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for name in ("tensorrt", "tensorrt_bindings"):
        source = site / name
        if not source.is_dir():
            continue
        target = stubs / name
        target.mkdir()
        for pyi in source.glob("*.pyi"):
            (target / pyi.name).write_text(repair(pyi.read_text()))


def repair(text: str) -> str:
    # `in` is a keyword: rename the parameter.
    text = re.sub(r"([(,]\s*)in(\s*:)", r"\1in_\2", text)
    # A parameter without a default after ones with defaults: give the earlier ones none.
    fixed = []
    for line in text.splitlines():
        match = re.match(r"(\s*def \w+\()(.*)(\)\s*->.*)", line)
        if match and "=" in match.group(2):
            params = [p.strip() for p in match.group(2).split(",")]
            if (
                any("=" in p for p in params[:-1])
                and "=" not in params[-1]
                and not params[-1].startswith("*")
            ):
                params = [p.split("=")[0].rstrip() for p in params]
                line = match.group(1) + ", ".join(params) + match.group(3)
        fixed.append(line)
    return "\n".join(fixed) + "\n"


if __name__ == "__main__":
    main()
