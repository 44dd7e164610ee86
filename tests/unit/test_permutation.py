from __future__ import annotations

import pytest
import torch

from codistill.data.permutation import LazyPermutation

SIZES = (1, 2, 3, 5, 7, 1000, 4097, 65537)


@pytest.mark.parametrize("n", SIZES)
def test_bijection_of_range(n: int) -> None:
    perm = LazyPermutation(n, seed=1234)
    images = perm(torch.arange(n))
    assert images.dtype == torch.int64 and images.shape == (n,)
    assert torch.equal(images.sort().values, torch.arange(n))
    assert len(perm) == n and perm.n == n


@pytest.mark.parametrize("n", SIZES)
def test_inverse_round_trips(n: int) -> None:
    perm = LazyPermutation(n, seed=99)
    x = torch.arange(n)
    assert torch.equal(perm.inverse(perm(x)), x)
    assert torch.equal(perm(perm.inverse(x)), x)


def test_n_one_is_identity() -> None:
    perm = LazyPermutation(1, seed=5)
    assert perm(torch.tensor([0, 0])).tolist() == [0, 0]
    assert perm.inverse(torch.tensor([0])).tolist() == [0]


def test_seed_fixes_the_order() -> None:
    x = torch.arange(1000)
    a, b = LazyPermutation(1000, seed=7)(x), LazyPermutation(1000, seed=7)(x)
    assert torch.equal(a, b)
    c = LazyPermutation(1000, seed=8)(x)
    assert not torch.equal(a, c)
    # Seeds are reduced to 64 bits: negative and oversized seeds are valid and wrap consistently.
    assert torch.equal(LazyPermutation(1000, seed=-1)(x), LazyPermutation(1000, seed=2**64 - 1)(x))
    assert torch.equal(LazyPermutation(1000, seed=3 + 2**64)(x), LazyPermutation(1000, seed=3)(x))


def test_order_is_pinned() -> None:
    # Pure integer math: these images must be the same on every process, platform and torch version,
    # so a resumed run reads the same samples. A change here changes every stored batch order.
    assert LazyPermutation(10, seed=0)(torch.arange(10)).tolist() == [6, 4, 2, 0, 3, 9, 8, 5, 1, 7]
    assert LazyPermutation(1000, seed=42)(torch.arange(8)).tolist() == [813, 332, 941, 751, 372, 362, 334, 93]
    big = LazyPermutation(10**10, seed=7)(torch.tensor([0, 1, 2, 10**10 - 1]))
    assert big.tolist() == [123606629, 1760034582, 8968804013, 6434385170]


def test_shape_preserved_and_input_untouched() -> None:
    perm = LazyPermutation(4097, seed=3)
    x = torch.arange(4096).reshape(64, 64)
    before = x.clone()
    y = perm(x)
    assert y.shape == (64, 64) and torch.equal(x, before)
    assert torch.equal(y.flatten(), perm(x.flatten()))
    assert torch.equal(perm.inverse(y), x)
    assert perm(torch.empty(0, dtype=torch.int64)).shape == (0,)
    # Other integer dtypes are accepted and widened to int64.
    assert torch.equal(perm(x.to(torch.int32)), y)


def test_first_image_uniform_over_seeds() -> None:
    n, seeds = 10, 2000
    firsts = torch.tensor([int(LazyPermutation(n, seed=s)(torch.tensor([0]))) for s in range(seeds)])
    counts = torch.bincount(firsts, minlength=n).double()
    expected = seeds / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 9 degrees of freedom: the 99.9% quantile is 27.9; 40 is loose but catches a biased round function.
    assert chi2 < 40.0, (chi2, counts.tolist())


def test_order_looks_shuffled() -> None:
    n = 1000
    x = torch.arange(n)
    y = LazyPermutation(n, seed=11)(x)
    assert int((y == x).sum()) < 10  # about one fixed point expected
    corr = torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1]
    assert abs(float(corr)) < 0.15
    # Neighbouring positions must not map to neighbouring ids (a sign of too few rounds or a weak mixer).
    assert float((y[1:] - y[:-1]).abs().double().mean()) > n / 5


def test_huge_n_distinct_in_range_and_round_trips() -> None:
    n = 10**10
    perm = LazyPermutation(n, seed=2024)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.arange(50_000), n - 1 - torch.arange(50_000)])
    x = x[torch.randperm(x.numel(), generator=g)]
    y = perm(x)
    assert y.dtype == torch.int64 and y.shape == x.shape
    assert int(y.min()) >= 0 and int(y.max()) < n
    assert torch.unique(y).numel() == x.numel()
    assert torch.equal(perm.inverse(y), x)


@pytest.mark.parametrize("bad", [[-1], [0, 10], [3, 2**40]])
def test_out_of_range_raises(bad: list[int]) -> None:
    perm = LazyPermutation(10, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        perm(torch.tensor(bad))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        perm.inverse(torch.tensor(bad))


def test_non_integer_input_raises() -> None:
    perm = LazyPermutation(10, seed=0)
    with pytest.raises(TypeError, match="integer"):
        perm(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("n", [0, -3, 2**62, 2**70])
def test_bad_n_raises(n: int) -> None:
    with pytest.raises(ValueError, match=rf"n={n}"):
        LazyPermutation(n, seed=0)


def test_bad_rounds_raises() -> None:
    with pytest.raises(ValueError, match="rounds"):
        LazyPermutation(10, seed=0, rounds=0)


def test_largest_n_round_trips() -> None:
    n = 2**62 - 1
    perm = LazyPermutation(n, seed=1)
    x = torch.tensor([0, 1, n // 2, n - 2, n - 1])
    y = perm(x)
    assert int(y.min()) >= 0 and int(y.max()) < n and torch.unique(y).numel() == 5
    assert torch.equal(perm.inverse(y), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    perm = LazyPermutation(10**10, seed=5)
    x = torch.arange(0, 10**10, 10**5)
    y = perm(x.cuda())
    assert y.device.type == "cuda"
    assert torch.equal(y.cpu(), perm(x))
