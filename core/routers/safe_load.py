"""torch.save files read without running their code: `torch.load(weights_only=True)` plus an
explicit allow-list of extra classes. Every checkpoint CacheKit reads (official L2C routers,
DyDiT and DyFLUX checkpoints) goes through `load_weights_only`; callers turn its two errors
into their own messages."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

# torch words a refused class differently across versions and opcodes ("Unsupported global:
# GLOBAL x", "unsupported GLOBAL x"): one pattern for all, so a refusal is never reported as a
# damaged file.
_REFUSED = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)


class RefusedGlobal(Exception):
    """The file asks to build a class outside the allow-list (nothing was built, no code ran)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class UnreadableCheckpoint(Exception):
    """Not a readable torch.save file (damaged, truncated, or something else). torch's own text is
    kept out of user messages: it suggests weights_only=False, which would run the file's code."""


def load_weights_only(path: Path, allowed: list[type], *, mmap: bool = False):
    """The file's contents on the CPU. `mmap` maps a large zip checkpoint instead of reading it
    (legacy, non-zip files are read whole)."""
    def load(use_mmap: bool):
        # torch warns about odd pickle protocols before failing on a junk file: the user gets our message only.
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=use_mmap)
    try:
        try:
            return load(mmap)
        except RuntimeError as error:
            if not mmap or "mmap" not in str(error).lower():
                raise
            return load(False)
    except Exception as error:      # the weights-only unpickler runs no code: any failure means a bad file
        refused = _REFUSED.search(str(error))
        if refused:
            raise RefusedGlobal(refused.group(1)) from error
        raise UnreadableCheckpoint(str(error)) from error
