"""Damaged model archives made on purpose, for the engine's and the host's refusal tests."""

import struct
from pathlib import Path


def encrypted_copy(source: Path, target: Path) -> Path:
    """A copy of the zip ``source`` with the "encrypted" flag set on every member.

    Python's zipfile cannot write an encrypted zip, and reading a member flagged so raises a
    bare RuntimeError ("password required"): the case the loaders must name.
    """
    data = bytearray(Path(source).read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (found := data.find(signature, start)) >= 0:
            data[found + flag_offset] |= 1  # general-purpose bit 0: encrypted
            start = found + 4
    target.write_bytes(bytes(data))
    return target


def with_declared_size(source: Path, target: Path, member: str, size: int) -> Path:
    """A copy of the zip ``source`` whose central directory declares ``member`` to inflate to
    ``size`` bytes, whatever it really holds: a zip bomb that passes a declared-size check."""
    data = bytearray(Path(source).read_bytes())
    name = member.encode()
    start = 0
    while (found := data.find(b"PK\x01\x02", start)) >= 0:
        name_length = struct.unpack_from("<H", data, found + 28)[0]
        if data[found + 46 : found + 46 + name_length] == name:
            struct.pack_into("<I", data, found + 24, size)  # uncompressed size
            target.write_bytes(bytes(data))
            return target
        start = found + 4
    raise ValueError(f"{source} has no member {member!r}")
