"""`batch-poller completion bash|zsh`: a completion script generated from the argument parser by shtab,
so every command and option the parser has is completed, and none it lacks."""

from __future__ import annotations

import argparse
from typing import Final

SHELLS: Final = ("bash", "zsh")


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab  # noqa: PLC0415 - only this command needs it

    text: str = shtab.complete(parser, shell=shell)
    return text if text.endswith("\n") else text + "\n"
