"""Sizes in bytes: `GIB` and the one parser of sizes people type (`--device_memory=80GiB`, shard sizes).

The parser follows transformers' convention (`convert_file_size_to_int`), so a size means the same here
as in `save_pretrained(max_shard_size=...)`: KB, MB, GB and TB are powers of 1000, KiB, MiB, GiB and
TiB powers of 1024, and a bare number counts bytes.
"""

from __future__ import annotations

import re

GIB = 2**30

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'80GiB' -> 80 * 2**30, '80GB' -> 80 * 10**9, '500MB', '95 gib', '80G', '1024' -> bytes.

    The unit's letters may be in any case and its final B left out ('80Gi' is 80GiB)."""
    match = _SIZE.fullmatch(text)
    if not match or (match.group(3) and not match.group(2)):
        raise ValueError(f"{text!r} is not a size: give one such as 80GiB or 80GB")
    number, prefix, binary = match.groups()
    power = "kmgt".index(prefix.lower()) + 1 if prefix else 0
    return round(float(number) * (1024 if binary else 1000) ** power)
