"""Metrics as JSON lines and TensorBoard event files, without TensorFlow.

A tfevents file is a sequence of records:  uint64 length | uint32 masked_crc32c(length bytes) |
payload | uint32 masked_crc32c(payload), little-endian, where the payload is a serialized
`tensorflow.Event` protobuf. We encode the few fields we need by hand:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }     Value { string tag = 1; float simple_value = 2; }
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from pathlib import Path

# ---------------------------------------------------------------------------------- CRC32C


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------- protobuf


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars: dict | None = None, file_version: str | None = None) -> bytes:
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def frame_record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


def read_records(path: str | os.PathLike) -> list[bytes]:
    """Payloads of a tfevents file, CRCs checked (for tests and tools)."""
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        payload = data[i + 12:i + 12 + n]
        (pcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        if pcrc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad payload CRC at byte {i}")
        out.append(payload)
        i += 16 + n
    return out


# ---------------------------------------------------------------------------------- writers


class MetricsWriter:
    """Appends {"step": s, ...} lines to DIR/metrics.jsonl and scalars to DIR/events.out.tfevents.*;
    a no-op on processes other than 0."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        d = Path(workdir)
        d.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(d / "metrics.jsonl", "a", buffering=1)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        (d / "tb").mkdir(exist_ok=True)
        self._tb = open(d / "tb" / name, "ab")
        self._tb.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._tb.flush()

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        scalars = {k: v for k, v in clean.items() if v is not None and math.isfinite(v)}
        self._tb.write(frame_record(encode_event(time.time(), step, scalars=scalars)))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


# ---------------------------------------------------------------------------------- MFU

# Peak dense bf16 FLOP/s per chip (anchors.md, "Numbers to aim at"); matched on device_kind.
PEAK_FLOPS = (
    ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5", 459e12), ("v4", 275e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
)


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "").lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None
