"""A fast structural mutator for the fuzz targets: hypothesis draws a seed per example, and each
example runs `PER_EXAMPLE` inputs derived from it with `random.Random` (hypothesis itself costs
about a millisecond per drawn value, too slow for 10,000 inputs per target in CI)."""

from __future__ import annotations

import os
import random
from typing import Any

PER_EXAMPLE = 10
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))  # x PER_EXAMPLE inputs per target

_ATOMS: list[Any] = [None, True, False, 0, 1, -1, 2**31, 2**63, -(2**63), 2**64 + 1, 1.5, float("nan"), "", "a",
                     "x" * 70, "00" * 32, "ff" * 64, "0" * 63, "G" * 64, b"", b"\x00" * 32, [], {}, "open", "join"]


def random_value(rng: random.Random, depth: int = 0, keys: tuple[str, ...] = ()) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.55:
        kind = rng.randrange(6)
        if kind == 0:
            return rng.choice(_ATOMS)
        if kind == 1:
            return rng.randrange(-(2**70), 2**70)
        if kind == 2:
            return "".join(rng.choice("0123456789abcdefABXYZ:-. \u00e9\u200b") for _ in range(rng.randrange(0, 130)))
        if kind == 3:
            return rng.randbytes(rng.randrange(0, 70))
        if kind == 4:
            return rng.randbytes(32).hex()
        return rng.randbytes(64).hex()
    if roll < 0.75:
        return [random_value(rng, depth + 1, keys) for _ in range(rng.randrange(0, 6))]
    out: dict[Any, Any] = {}
    for _ in range(rng.randrange(0, 7)):
        key = rng.choice(keys) if keys and rng.random() < 0.7 else random_value(rng, 4)
        out[key if not isinstance(key, list | dict) else repr(key)] = random_value(rng, depth + 1, keys)
    return out


def mutate(rng: random.Random, value: Any, keys: tuple[str, ...], depth: int = 0) -> Any:
    """`value` with one to three changes somewhere inside: a field replaced, removed or added."""
    if not isinstance(value, dict | list) or depth > 4 or rng.random() < 0.15:
        return random_value(rng, depth, keys)
    if isinstance(value, list):
        out = list(value)
        if not out or rng.random() < 0.3:
            out.insert(rng.randrange(len(out) + 1), random_value(rng, depth + 1, keys))
        else:
            i = rng.randrange(len(out))
            if rng.random() < 0.3:
                del out[i]
            else:
                out[i] = mutate(rng, out[i], keys, depth + 1)
        return out
    d = dict(value)
    for _ in range(rng.randrange(1, 4)):
        name = rng.choice(list(d) or [*keys, "x"]) if rng.random() < 0.8 else rng.choice([*keys, "extra"])
        action = rng.random()
        if action < 0.2:
            d.pop(name, None)
        elif name in d and action < 0.7:
            d[name] = mutate(rng, d[name], keys, depth + 1)
        else:
            d[name] = random_value(rng, depth + 1, keys)
    return d
