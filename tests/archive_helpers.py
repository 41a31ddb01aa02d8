"""Damaged model archives made on purpose, for the engine's and the host's refusal tests."""

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
