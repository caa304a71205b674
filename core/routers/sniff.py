"""What a would-be router file holds, from its first bytes, so a wrong file gets a message that
says what it is (text, a safetensors file named .pt, ...) instead of a parser's raw error."""
from __future__ import annotations

from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"                                   # torch.save's default format: a zip archive
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"    # torch.save(_use_new_zipfile_serialization=False)
PICKLE_PROTOCOLS = range(2, 6)                              # a bare pickle starts with PROTO (0x80) and 2..5


def content_kind(path: Path) -> str:
    """'empty', 'safetensors', 'torch' (torch.save's zip or legacy format), 'pickle', 'text' or 'unknown'."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head.startswith((ZIP_MAGIC, LEGACY_TORCH_MAGIC)):
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) >= 10 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:           # not just a character cut at the 512th byte
            return "unknown"
        text = head[:error.start].decode("utf-8")
    return "text" if all(c.isprintable() or c.isspace() for c in text) else "unknown"


def wrong_content(path: Path, expected: str) -> str | None:
    """Why `path` cannot be a router of the `expected` kind ('safetensors' or 'torch'), or None
    when it may be one. Unrecognised bytes are left to the parser, which says the file is not
    readable: random bytes must not be mistaken for any kind."""
    kind = content_kind(path)
    if kind in ("unknown", "pickle", expected):      # a bare pickle may be an official router
        return None
    name = path.name
    if kind == "empty":
        return f"{name} is empty (0 bytes); copy the router file again."
    if kind == "text":
        return f"{name} is a text file, not a router."
    if kind == "safetensors":
        rename = "" if path.suffix.lower() == ".safetensors" else f": rename it to {path.stem}.safetensors"
        return f"{name} is a safetensors file, not an official L2C .pt/.pth router{rename}."
    if kind == "torch":
        rename = "" if path.suffix.lower() in (".pt", ".pth") else f"; if it is an official L2C router, rename it to " \
                                                                   f"{path.stem}.pt"
        return (f"{name} is a PyTorch file, not a CacheKit .safetensors router{rename}; convert official L2C "
                "routers with scripts/convert_router.py.")
    raise AssertionError(kind)


def read_sidecar(path: Path, error: type[Exception], what: str, fix: str, keep=None) -> tuple[dict, dict]:
    """(metadata, tensors) of a CacheKit safetensors side-car, or `error` naming what the file
    is instead (missing, empty, text, a PyTorch checkpoint, damaged), that it should be `what`,
    and `fix`. `keep(key)` picks the tensors read (all by default). Never runs code from the file."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    kind = content_kind(path)
    if kind == "torch":
        raise error(f"{path.name} is a PyTorch checkpoint, not a {what} (.safetensors): {fix}.")
    if kind in ("empty", "text"):
        raise error(f"{path.name} is {'empty' if kind == 'empty' else 'a text file'}, not a {what} (.safetensors): "
                    f"{fix}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys() if keep is None or keep(key)}
    except Exception as failure:      # safetensors runs no code: any failure means a damaged file
        raise error(f"{path.name} is not a readable safetensors file ({type(failure).__name__}): it is damaged "
                    f"(truncated?) or not a {what}; {fix}.") from failure
    return metadata, state
