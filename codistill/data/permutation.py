"""A pseudo-random permutation of [0, n) evaluated on demand, in O(1) memory.

`torch.randperm(n)` holds n int64 ids (80 GB for ten billion samples), so a batch order over prepared
shards of a large corpus cannot be materialised. `LazyPermutation` instead computes the image of any
position directly from (seed, position): a batch of sample ids at step k is `perm(positions of step k)`,
which keeps batch order a pure function of (seed, step), as it is for in-memory data sets, and makes
resume exact without storing an order. Pure integer math on int64 tensors (no hash(), no torch RNG), so
every process and platform computes the same order. No ray, no mlflow; only torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["LazyPermutation"]

_MASK64 = (1 << 64) - 1
_MASK31 = (1 << 31) - 1
# Odd multipliers below 2^31 (MurmurHash2's and Thomas Wang's): with operands below 2^31 every
# product is below 2^62, so the mixer never overflows int64 and never depends on wrap-around.
_MUL_A = 0x5BD1E995
_MUL_B = 0x27D4EB2D
# n < 2^62 keeps the Feistel halves within 31 bits, the width of the overflow-free mixer above.
_MAX_N = 1 << 62


def _splitmix64(state: int) -> tuple[int, int]:
    """One step of splitmix64 in exact Python ints: (next state, 64-bit output)."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche mixer of 31-bit non-negative integers (xorshift-multiply, murmur fmix style).
    Every intermediate stays in [0, 2^62), so `>>` only ever sees non-negative values (torch's `>>` is
    arithmetic on negatives) and each product is exact."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK31
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK31
    return x ^ (x >> 16)


class LazyPermutation:
    """A bijection of [0, n) fixed by `seed`, evaluated elementwise on int64 tensors in O(1) memory.

    A balanced Feistel network on 2h bits, where 2^(2h) is the smallest power of four >= n, permutes
    [0, 2^(2h)); cycle walking (Black & Rogaway, "Ciphers with Arbitrary Finite Domains", CT-RSA 2002)
    restricts it to [0, n) by re-applying the network to every image that lands at or above n until it
    lands inside. The result is a permutation of [0, n) because walking from a point in [0, n) follows its
    cycle of the big permutation to the next point of that cycle in [0, n). The domain is below 4n, so an
    element needs fewer than four walks on average. `inverse` walks the inverse network the same way: the
    inverse of a cycle-walked permutation is the cycle-walked inverse.

    The round function is a keyed 31-bit integer mixer; the round keys come from `seed` (reduced to 64 bits)
    through splitmix64. The order is a statistically shuffled one, not a cryptographic one.
    """

    def __init__(self, n: int, seed: int, rounds: int = 6) -> None:
        n = int(n)
        if n < 1 or n >= _MAX_N:
            raise ValueError(f"LazyPermutation: n must be in [1, 2**62), got n={n}")
        if rounds < 1:
            raise ValueError(f"LazyPermutation: rounds must be >= 1, got rounds={rounds}")
        self.n: int = n
        self.seed: int = int(seed) & _MASK64
        self.rounds: int = int(rounds)
        # Half width h: 2h is the smallest even bit count with 2^(2h) >= n (h = 0 for n = 1: identity).
        self._half_bits: int = ((n - 1).bit_length() + 1) // 2
        self._half_mask: int = (1 << self._half_bits) - 1
        # Two 31-bit keys per round, cut from one splitmix64 output, so the mixer inputs stay 31-bit.
        keys: list[tuple[int, int]] = []
        state = self.seed
        for _ in range(self.rounds):
            state, z = _splitmix64(state)
            keys.append((z & _MASK31, (z >> 32) & _MASK31))
        self._keys: tuple[tuple[int, int], ...] = tuple(keys)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"LazyPermutation(n={self.n}, seed={self.seed}, rounds={self.rounds})"

    def _round(self, half: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        # Key injected before each of two mixer passes, so the round function is not a fixed mixer of a
        # shifted input; truncating to h bits keeps the Feistel halves inside their width.
        return _mix31(_mix31(half ^ key[0]) ^ key[1]) & self._half_mask

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._half_bits
        left, right = x >> h, x & self._half_mask
        for key in self._keys:
            left, right = right, left ^ self._round(right, key)
        return (left << h) | right

    def _backward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._half_bits
        left, right = x >> h, x & self._half_mask
        for key in reversed(self._keys):
            left, right = right ^ self._round(left, key), left
        return (left << h) | right

    def _checked(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """`t` as int64 after one cheap range check (a single min/max reduction per call)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"LazyPermutation: {what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"LazyPermutation: {what} must be an integer tensor, got dtype {t.dtype}")
        t = t.to(torch.int64)
        if t.numel() > 0:
            lo, hi = torch.aminmax(t)
            lo_i, hi_i = int(lo), int(hi)
            if lo_i < 0 or hi_i >= self.n:
                raise ValueError(f"LazyPermutation: {what} must lie in [0, {self.n}), got values in [{lo_i}, {hi_i}]")
        return t

    def _walk(self, t: torch.Tensor, network: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Cycle walking: re-apply `network` to the images still outside [0, n) until none is left."""
        out = network(t.reshape(-1))
        # Only the stragglers are re-encrypted each pass, so the work shrinks geometrically; walking ends
        # because every cycle through a start point in [0, n) comes back into [0, n).
        idx = (out >= self.n).nonzero().squeeze(1)
        while idx.numel() > 0:
            walked = network(out[idx])
            out[idx] = walked
            idx = idx[walked >= self.n]
        return out.reshape(t.shape)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """The images of `positions` (integers in [0, n)): an int64 tensor of the same shape and device."""
        return self._walk(self._checked(positions, "positions"), self._forward)

    def inverse(self, values: torch.Tensor) -> torch.Tensor:
        """The positions whose images are `values` (integers in [0, n)): `inverse(perm(x)) == x`."""
        return self._walk(self._checked(values, "values"), self._backward)
