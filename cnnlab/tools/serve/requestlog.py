"""The request log: one JSON object a line per request, never the image.

{"time": "2025-01-01T12:00:00.123+00:00", "route": "/v1/predict", "status": 200, "latency_ms": 3.2,
 "classes": ["7", "1"]}: `classes` holds each image's top-1 class, `reason` a refusal's reason.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cnnlab.errors import CnnlabError


class RequestLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            # Line-buffered append: each record reaches the file whole, and a restart adds to it.
            self._file = self.path.open("a", buffering=1, encoding="utf-8")
        except OSError as exc:
            raise CnnlabError(f"cannot write the request log {self.path}: {exc.strerror}") from None

    def write(self, route: str, status: int, latency_ms: float, **extra: Any) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "route": route,
                  "status": status, "latency_ms": round(latency_ms, 3), **extra}  # fmt: skip
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()
