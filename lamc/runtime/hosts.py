"""Where each stage is served: a hosts file, or `--endpoint STAGE=HOST:PORT` options.

```yaml
stages:               # one address per stage, in pipeline order
  - 10.0.0.2:50051
  - 10.0.0.3:50051
  - 10.0.0.4:50051
tls: {ca: ca.pem, cert: client.pem, key: client.key, server_name: lamc-stage}
token_file: token.txt  # or set $LAMC_TOKEN
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lamc.errors import ConfigError, UsageError
from lamc.runtime.security import TlsConfig, host_of, load_token
from lamc.yamlfile import LinedDict, LinedList, line_of, load_yaml


@dataclass
class Endpoints:
    stages: dict[int, str]
    tls: TlsConfig | None = None
    token: str | None = None

    def address(self, stage: int) -> str:
        if stage not in self.stages:
            raise UsageError(
                f"no address for stage {stage}",
                hint="list every stage in the hosts file or pass --endpoint K=HOST:PORT",
            )
        return self.stages[stage]


def load_hosts(path: Path) -> Endpoints:
    doc, source = load_yaml(path)
    if not isinstance(doc, LinedDict):
        raise source.error(None, "(document)", "a hosts file is a mapping with `stages:`")
    for key in doc:
        if key not in ("stages", "tls", "token_file"):
            raise source.error(
                line_of(doc, key), key, "unknown field", hint="fields: stages, tls, token_file"
            )
    raw = doc.get("stages")
    if not isinstance(raw, LinedList) or not raw:
        raise source.error(line_of(doc, "stages"), "stages", "must list one HOST:PORT per stage")
    stages: dict[int, str] = {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, str):
            raise source.error(line_of(raw, i), f"stages[{i}]", f"must be HOST:PORT, got {entry!r}")
        try:
            host_of(entry)
        except UsageError as exc:
            raise source.error(line_of(raw, i), f"stages[{i}]", str(exc)) from None
        stages[i] = entry
    tls = None
    if "tls" in doc:
        block = doc["tls"]
        if not isinstance(block, LinedDict):
            raise source.error(
                line_of(doc, "tls"), "tls", "must be a mapping {ca, cert, key, server_name}"
            )
        paths = {
            k: (path.parent / str(block[k])) if k in block else None for k in ("ca", "cert", "key")
        }
        server_name = block.get("server_name")
        tls = TlsConfig.from_files(
            paths["cert"],
            paths["key"],
            paths["ca"],
            server_name=str(server_name) if server_name else None,
        )
        if tls is None:
            raise ConfigError(f"{path}:{line_of(doc, 'tls')}: tls: name at least `ca`")
    token_file = doc.get("token_file")
    token = load_token(path.parent / str(token_file) if token_file else None)
    return Endpoints(stages, tls, token)


def parse_endpoints(values: tuple[str, ...]) -> dict[int, str]:
    stages: dict[int, str] = {}
    for item in values:
        key, sep, address = item.partition("=")
        if not sep or not key.strip().isdigit():
            raise UsageError(f"--endpoint {item!r} is not STAGE=HOST:PORT")
        host_of(address.strip())
        stages[int(key)] = address.strip()
    return stages
