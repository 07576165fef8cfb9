"""The formats one INT4 unit can take, what each costs in bytes, and its output error.

`--bits 4` stores most weights as 4-bit blocks; under a size budget (`--budget`) or a preset
(`--mix`) a unit may instead be 4-bit with coarser blocks (fewer scales), 8-bit
(`MatMulNBits` bits=8, symmetric blocks), or stay float. Sizes are exact for the layouts
written (`rewrite.py`), so a budget in bits per weight or bytes holds for the written file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantcli.quantize.math.int4 import n_blocks_for

COARSE_BLOCKS = (128, 64, 32)  # the coarse 4-bit option: the one storing fewest bytes
# Compact (float16) scales only for tensors of at least this many scales: the Cast and Mul
# nodes that widen them, the factor and their names weigh 0.5-0.9 KB (longer node names
# cost more), against the 2 bytes a scale saves.
COMPACT_MIN_SCALES = 512


def compact_scales(count: int) -> bool:
    """Whether a float32 weight's ``count`` scales are stored compact (float16)."""
    return count >= COMPACT_MIN_SCALES


@dataclass(frozen=True)
class Choice:
    bits: int  # 4 or 8; 0: the weight stays float
    block_size: int = 0

    @property
    def name(self) -> str:
        return "float" if self.bits == 0 else f"int{self.bits}-b{self.block_size}"

    @property
    def is_float(self) -> bool:
        return self.bits == 0


FLOAT = Choice(0)


def parse_choice(text: str) -> Choice:
    if text == "float":
        return FLOAT
    bits, _, block = text.partition("-b")
    return Choice(int(bits.removeprefix("int")), int(block))


def coarse_block(k: int, divisible: bool = False, scale_bytes: int = 4) -> int:
    """The 4-bit block of the coarse option for reduction size K: the one of COARSE_BLOCKS
    with the least stored bytes (padding counts); ``divisible`` when K must split evenly
    (a table shared with GatherBlockQuantized)."""
    options = [b for b in COARSE_BLOCKS if not divisible or k % b == 0]
    if not options:
        return 32 if k % 32 == 0 or not divisible else 16
    return min(options, key=lambda b: (n_blocks_for(k, b) * (b * 4 + 8 * scale_bytes + 4), -b))


def int8_block(k: int, divisible: bool = False, scale_bytes: int = 4) -> int:
    """The 8-bit option's block: the one of 128/64/32/16 storing fewest bytes for K."""
    options = [b for b in (128, 64, 32, 16) if not divisible or k % b == 0] or [16]
    return min(options, key=lambda b: (n_blocks_for(k, b) * (b + scale_bytes), -b))


def weight_bytes(
    choice: Choice,
    k: int,
    n: int,
    *,
    scale_bytes: int,
    float_bytes: int,
    symmetric: bool,
    layout: str = "matmulnbits",
) -> int:
    """Bytes stored for one [K, N] weight in `choice` (compact scales: ``scale_bytes`` 2,
    and the caller adds the 4-byte factor of each scales tensor).

    layout: ``matmulnbits`` (B padded to whole blocks, zero points packed per column),
    ``qdq`` (DequantizeLinear tensors: no padding, packed flat) or ``gather``
    (GatherBlockQuantized with an int4 table: like ``qdq``).
    """
    if choice.is_float:
        return k * n * float_bytes
    nb = n_blocks_for(k, choice.block_size)
    scales = nb * n * scale_bytes
    if choice.bits == 8:
        data = nb * choice.block_size * n if layout == "matmulnbits" else k * n
        return data + scales
    if layout == "matmulnbits":
        data = n * nb * choice.block_size // 2
        zeros = 0 if symmetric else n * -(-nb // 2)
    else:
        data = -(-k * n // 2)
        zeros = 0 if symmetric else -(-nb * n // 2)
    return data + scales + zeros


# ------------------------------------------------------------------------- 8-bit blocks


@dataclass(frozen=True)
class Int8Blocks:
    """Symmetric 8-bit blocks along K: ``q`` int8 ``[k_padded, N]``, ``scales`` ``[nb, N]``."""

    q: np.ndarray
    scales: np.ndarray
    block_size: int
    k: int

    def dequantize(self) -> np.ndarray:
        scale = np.repeat(self.scales, self.block_size, axis=0)
        return (self.q.astype(np.float32) * scale)[: self.k]


def quantize_int8_blocks(w: np.ndarray, block_size: int) -> Int8Blocks:
    """Round-to-nearest, q = round(w / s) in [-127, 127], s = max|w| / 127 per block."""
    k, n = w.shape
    nb = n_blocks_for(k, block_size)
    padded = np.zeros((nb * block_size, n), np.float32)
    padded[:k] = w
    grouped = padded.reshape(nb, block_size, n)
    scale = np.abs(grouped).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(grouped / scale[:, None, :]), -127, 127).astype(np.int8)
    return Int8Blocks(q.reshape(-1, n), scale, block_size, k)


def output_error(w: np.ndarray, deq: np.ndarray, hessian: np.ndarray | None) -> float:
    """sum over output columns of dW^T H dW (H = E[x x^T]): the mean squared error the
    weight error adds to the layer's output; plain squared weight error without H."""
    dw = (np.asarray(w, np.float32) - deq).astype(np.float64)
    if hessian is None:
        return float(np.square(dw).sum())
    return float(np.einsum("kn,kn->", hessian @ dw, dw))
