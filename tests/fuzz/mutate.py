"""Mutations of a valid GGUF or safetensors file: header fields, lengths, offsets, types, truncation.

The GGUF walker here is the fuzzer's own (not edgellm's parser), so a bug in edgellm's reader
cannot hide the field it mis-reads. Each mutation returns the new bytes and a short label that
says what was changed, so a finding can be reproduced from the run's report.
"""

from __future__ import annotations

import json
import random
import struct
from collections import defaultdict
from dataclasses import dataclass

__all__ = ["GGUFMap", "mutate_gguf", "mutate_safetensors"]

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
#: Metadata keys whose values llama.cpp trusts most (suffixes after "{arch}.").
SEMANTIC_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length",
                 "attention.head_count", "attention.head_count_kv", "attention.key_length",
                 "rope.dimension_count", "vocab_size", "expert_count", "expert_used_count")


@dataclass(frozen=True)
class Field:
    """One fixed-size number in the file: where, how wide, what it is."""

    offset: int
    size: int
    label: str


class GGUFMap:
    """The numeric fields of a valid GGUF's header, grouped by kind, and where its data begins."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.kinds: dict[str, list[Field]] = defaultdict(list)
        self.values: dict[str, Field] = {}  # scalar metadata values by key
        self.strings: dict[str, tuple[int, int]] = {}  # string values by key: (start, end) in the file
        self.pos = 4
        self._walk()

    def _num(self, kind: str, size: int, label: str) -> int:
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size]
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        field = Field(self.pos, size, label)
        self.kinds[kind].append(field)
        self.pos += size
        self._last = field
        return int(value)

    def _string(self, kind: str, label: str) -> str:
        n = self._num(kind, 8, label)
        text = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return text

    def _value(self, vtype: int, key: str, in_array: bool) -> None:
        if vtype == 8:
            start = self.pos
            self._string("array string length" if in_array else "string length", key)
            if not in_array:
                self.strings[key] = (start, self.pos)
        elif vtype == 9:
            item = self._num("array item type", 4, key)
            n = self._num("array count", 8, key)
            for _ in range(n):
                self._value(item, key, True)
        else:
            size = _SCALAR_SIZES[vtype]
            if in_array:
                self.pos += size
            else:
                self._num("scalar value", size, key)
                self.values[key] = self._last

    def _walk(self) -> None:
        self._num("version", 4, "version")
        n_tensors = self._num("counts", 8, "n_tensors")
        n_kv = self._num("counts", 8, "n_kv")
        for _ in range(n_kv):
            key = self._string("key length", "key")
            self._value(self._num("value type", 4, key), key, False)
        for _ in range(n_tensors):
            name = self._string("tensor name length", "tensor")
            n_dims = self._num("tensor n_dims", 4, name)
            for _ in range(n_dims):
                self._num("tensor dim", 8, name)
            self._num("tensor type", 4, name)
            self._num("tensor offset", 8, name)
        self.header_end = self.pos


def _interesting(rng: random.Random, size: int, old: int) -> int:
    top = (1 << (8 * size)) - 1
    picks = [0, 1, 2, 3, 7, 255, 513, 1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 60,
             (1 << 63) - 1, 1 << 63, top, old + 1, max(old - 1, 0), old * 2, rng.randrange(top + 1)]
    return rng.choice(picks) & top


def _set(data: bytearray, field: Field, value: int) -> None:
    data[field.offset:field.offset + field.size] = value.to_bytes(field.size, "little")


def mutate_gguf(data: bytes, gmap: GGUFMap, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a GGUF: a header field, a model key, a truncation, flipped bytes, or data."""
    out = bytearray(data)
    op = rng.choice(["field", "field", "key", "key", "text", "truncate", "flip", "data"])
    if op == "field":
        kind = rng.choice(sorted(gmap.kinds))
        field = rng.choice(gmap.kinds[kind])
        old = int.from_bytes(data[field.offset:field.offset + field.size], "little")
        value = _interesting(rng, field.size, old)
        _set(out, field, value)
        return bytes(out), f"{kind} of {field.label!r} at {field.offset}: {old} -> {value}"
    if op == "key":
        keys = [k for k in gmap.values if k.split(".", 1)[-1] in SEMANTIC_KEYS or k == "general.alignment"]
        key = rng.choice(keys)
        field = gmap.values[key]
        old = int.from_bytes(data[field.offset:field.offset + field.size], "little")
        value = _interesting(rng, field.size, old)
        _set(out, field, value)
        return bytes(out), f"key {key}: {old} -> {value}"
    if op == "text":
        return _replace_string(data, gmap, rng)
    if op == "truncate":
        end = gmap.header_end if rng.random() < 0.6 else len(data)
        cut = rng.randrange(0, end)
        return bytes(data[:cut]), f"truncated at {cut} of {len(data)}"
    if op == "flip":
        spots = sorted(rng.randrange(4, gmap.header_end) for _ in range(rng.randint(1, 4)))
        for at in spots:
            out[at] ^= 1 << rng.randrange(8)
        return bytes(out), f"bits flipped at {spots}"
    at = rng.randrange(gmap.header_end, len(data) - 64)
    out[at:at + 64] = rng.choice([b"\xff" * 64, bytes(rng.randrange(256) for _ in range(64))])
    return bytes(out), f"64 tensor-data bytes at {at} overwritten"


#: Replacement texts for string values: other tokenizer models and architectures, empty, long.
TEXTS = ["llama", "gpt2", "bert", "t5", "rwkv", "plamo2", "none", "no_vocab", "qwen2", "gemma3", "phi3",
         "bogus", "", "x" * 5000]


def _replace_string(data: bytes, gmap: GGUFMap, rng: random.Random) -> tuple[bytes, str]:
    """A string value replaced by another text; the header is re-padded so the data stays aligned."""
    key = rng.choice(sorted(gmap.strings))
    start, end = gmap.strings[key]
    text = rng.choice(TEXTS).encode()
    head = data[:start] + struct.pack("<Q", len(text)) + text + data[end:gmap.header_end]
    align = 32  # the seeds carry no general.alignment
    data_start = -(-gmap.header_end // align) * align
    padded = head + bytes(-len(head) % align)
    return padded + data[data_start:], f"string {key!r} -> {text[:20]!r}"


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F33", "", None, 5, ["F32"]]


def _shape_change(rng: random.Random, shape: list) -> object:
    return rng.choice([[d * 2 for d in shape], [0, *shape[1:]], [-1, *shape[1:]], [*shape, 1], shape[:-1],
                       [1 << 40, *shape[1:]], [float(d) for d in shape], "64", None, [True] * len(shape)])


def _offsets_change(rng: random.Random, offsets: list, others: list[list]) -> object:
    b, e = offsets
    k = rng.choice([1, 2, 4, 64])
    return rng.choice([[b + k, e + k], [b - k, e - k], [b, e + k], [b, e - k], [e, b], [b, b],
                       rng.choice(others), [b, 1 << 62], [-8, e], [b, float(e)], [b], "0,4", None])


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a safetensors file: dtype, shape, offsets, entries, header length, bytes."""
    header, body = _split(data)
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    op = rng.choice(["dtype", "shape", "offsets", "offsets", "drop", "metadata", "hlen", "truncate", "flip",
                     "json"])
    entry = header[name]
    if op == "dtype":
        entry["dtype"] = rng.choice(_DTYPES)
        return _join(header, body), f"{name}: dtype -> {entry['dtype']!r}"
    if op == "shape":
        entry["shape"] = _shape_change(rng, list(entry["shape"]))
        return _join(header, body), f"{name}: shape -> {entry['shape']!r}"
    if op == "offsets":
        others = [header[n]["data_offsets"] for n in names if n != name] or [[0, 0]]
        entry["data_offsets"] = _offsets_change(rng, list(entry["data_offsets"]), others)
        return _join(header, body), f"{name}: data_offsets -> {entry['data_offsets']!r}"
    if op == "drop":
        del header[name]
        return _join(header, body), f"{name}: entry removed"
    if op == "metadata":
        header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"a": {"b": "c"}}])
        return _join(header, body), f"__metadata__ -> {header['__metadata__']!r}"
    out = bytearray(data)
    if op == "hlen":
        value = _interesting(rng, 8, struct.unpack_from("<Q", data)[0])
        out[:8] = value.to_bytes(8, "little")
        return bytes(out), f"header length -> {value}"
    if op == "truncate":
        cut = rng.randrange(0, len(data))
        return bytes(data[:cut]), f"truncated at {cut} of {len(data)}"
    (n,) = struct.unpack_from("<Q", data)
    if op == "flip":
        spots = sorted(rng.randrange(8, 8 + n) for _ in range(rng.randint(1, 4)))
        for at in spots:
            out[at] ^= 1 << rng.randrange(8)
        return bytes(out), f"header bits flipped at {spots}"
    raw = rng.choice([b"[" * 100000, b'{"a": 1, "a": {"dtype": "F32"}}', b"\xff\xfe{}", b"{}" + b" " * 10])
    return struct.pack("<Q", len(raw)) + raw + body, f"header replaced by {raw[:20]!r}..."
