"""Store settings: CLI flags, then environment variables, then a config file, then defaults.

The config file is `$MEMLM_CONFIG`, else `$MEMLM_HOME/config.toml` (when it exists):

    [store]
    url = "grpc://10.0.0.5:50052"     # what `open_store()` opens (env MEMLM_STORE)
    token = "s3cret"                   # bearer token, client and server (env MEMLM_TOKEN)
    tls_ca = "/etc/memlm/ca.pem"       # CA bundle for grpcs:// (env MEMLM_TLS_CA)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

ENV_VARS = {"url": "MEMLM_STORE", "token": "MEMLM_TOKEN", "tls_ca": "MEMLM_TLS_CA"}


def memlm_home() -> Path:
    return Path(os.environ.get("MEMLM_HOME", Path.home() / ".memlm"))


def config_file() -> Path:
    return Path(os.environ.get("MEMLM_CONFIG", memlm_home() / "config.toml"))


@dataclass
class StoreSettings:
    url: str | None = None  # None: FAISS under $MEMLM_HOME/memories
    token: str | None = None
    tls_ca: str | None = None

    @classmethod
    def resolve(cls, **flags: str | None) -> StoreSettings:
        """Each setting from the first source that has it: `flags` (None = not given), the
        environment, the config file's [store] table."""
        path = config_file()
        from_file = tomllib.loads(path.read_text()).get("store", {}) if path.is_file() else {}
        unknown = set(from_file) - set(ENV_VARS)
        if unknown:
            raise ValueError(f"{path}: unknown [store] settings {sorted(unknown)}; known: {sorted(ENV_VARS)}")
        values = {}
        for setting in fields(cls):
            flag = flags.get(setting.name)
            from_env = os.environ.get(ENV_VARS[setting.name])
            values[setting.name] = flag if flag is not None else from_env or from_file.get(setting.name)
        return cls(**values)
