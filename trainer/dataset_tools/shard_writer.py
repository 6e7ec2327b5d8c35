"""Writing shards: plain, byte-deterministic tars, written under a temporary name and renamed when complete."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

SHARD_PATTERN = "{split}-{index:06d}.tar"


def shard_name(split: str, index: int) -> str:
    return SHARD_PATTERN.format(split=split, index=index)


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class ShardWriter:
    """A tar of samples: `write(key, {"json": bytes, "jpg": bytes, "1.jpg": bytes})`.

    Members carry mtime 0 and no owner, so the same samples give the same bytes. The file appears under its
    final name only after `close()`; on error, `abort()` removes the partial file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close/abort)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"shard key {key!r} must not contain '.' or '/'")
        for ext, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o644
            self.tar.addfile(info, io.BytesIO(payload))
        self.count += 1

    def close(self) -> Path:
        self.tar.close()
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
