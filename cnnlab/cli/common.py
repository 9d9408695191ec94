"""What every command module shares: the one-line argument parser, optional extras, shapes and JSON output."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Iterator

from cnnlab.errors import CnnlabError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other cnnlab error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CnnlabError(f"{message} (see `{self.prog} --help`)")


@contextlib.contextmanager
def needs_extra(command: str, extra: str) -> Iterator[None]:
    """A package of an optional extra missing (imported where it is used, even mid-command): one clear line."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("cnnlab"):
            raise
        raise CnnlabError(f"cnnlab {command} needs {exc.name}: pip install 'cnnlab[{extra}]'") from None


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        channels, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CnnlabError(f"--input must look like 1x28x28 (channels x height x width), got '{text}'") from None
    return channels, height, width


def run_dir_of(checkpoint_path: Path) -> Path:
    return checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent


def print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))
