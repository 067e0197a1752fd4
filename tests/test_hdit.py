"""HDiT (Crowson et al. 2024, arXiv:2401.11605), each part against an answer computed another way: neighbourhood
attention against explicit masked softmax attention with a brute-force neighbourhood mask; axial RoPE scores depend
only on the offset between positions and rotations keep norms; token merge against a hand-written index mapping,
split as its inverse; the neighbourhood's cost per query does not grow with the grid; tiny forwards.
"""

import itertools
import math

import pytest
import torch

import models as M


def positions(grid):
    """Every coordinate of the grid in row-major (flattening) order."""
    return list(itertools.product(*[range(n) for n in grid]))


def window_start(i, n, kernel):
    """First position of the window of k = min(kernel, n) consecutive positions of an axis of size n whose centre
    is nearest to i (odd kernel: unique), found by trying every start rather than by a clamp formula."""
    k = min(kernel, n)
    return min(range(n - k + 1), key=lambda s: abs(s + (k - 1) / 2 - i))


def neighbourhood_mask(grid, kernel):
    """(L, L) bool, [i, j] True where token j lies in token i's window on every axis, by brute force."""
    kernel = (kernel,) * len(grid) if isinstance(kernel, int) else kernel
    coords = positions(grid)
    starts = [[window_start(i, n, k) for i in range(n)] for n, k in zip(grid, kernel)]
    sizes = [min(k, n) for n, k in zip(grid, kernel)]
    inside = lambda a, i, j: starts[a][i] <= j < starts[a][i] + sizes[a]
    return torch.tensor([[all(inside(a, p[a], r[a]) for a in range(len(grid))) for r in coords] for p in coords])


@pytest.mark.parametrize(
    "grid,kernel",
    [
        ((11,), 5),  # 1D, odd side
        ((5,), 7),  # 1D, side smaller than the kernel: the whole side
        ((70,), 7),  # 1D, two tiles, the last shifted inward (70 is not a multiple of 64)
        ((9, 7), 5),  # 2D, odd sides
        ((13, 4), 5),  # 2D, one side smaller than the kernel, a shifted last tile
        ((10, 9), (3, 7)),  # 2D, a kernel per axis
        ((5, 6, 3), 3),  # 3D
        ((7, 2, 5), 3),  # 3D, a side smaller than the kernel
    ],
)
def test_neighbourhood_attention_equals_masked_full_attention(grid, kernel):
    """Every query of the grid is compared, so every border, edge and corner query is checked."""
    torch.manual_seed(0)
    L = math.prod(grid)
    q, k, v = torch.randn(3, 2, 3, L, 8).unbind(0)  # B = 2, 3 heads, head dim 8
    allowed = neighbourhood_mask(grid, kernel)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)  # (B, heads, L, L): explicit full attention
    expected = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1) @ v
    torch.testing.assert_close(M.neighbourhood_attention(q, k, v, grid, kernel), expected, atol=1e-5, rtol=1e-5)


def test_reference_mask_at_corners_and_borders():
    """The brute-force reference itself: corner and border windows are shifted inward, interior ones centred."""
    grid, kernel = (9, 7), 5
    mask = neighbourhood_mask(grid, kernel).view(*grid, *grid)
    block = lambda rows, cols: (
        torch.zeros(grid, dtype=torch.bool).index_fill(0, torch.arange(*rows), True)
        & (torch.zeros(grid, dtype=torch.bool).index_fill(1, torch.arange(*cols), True))
    )
    assert torch.equal(mask[0, 0], block((0, 5), (0, 5)))  # top-left corner
    assert torch.equal(mask[8, 6], block((4, 9), (2, 7)))  # bottom-right corner
    assert torch.equal(mask[1, 3], block((0, 5), (1, 6)))  # near the top border, centred along the columns
    assert torch.equal(mask[4, 3], block((2, 7), (1, 6)))  # interior: centred


@pytest.mark.parametrize("grid,cell", [((12,), (1,)), ((5, 7), (1, 1)), ((4, 3), (2, 4)), ((3, 4, 5), (1, 1, 1))])
def test_axial_rope_is_relative_and_keeps_norms(grid, cell):
    """One query vector and one key vector placed at every position: the score of (p, p') depends only on p - p'
    (all pairs with the same offset agree, i.e. shifting both positions changes nothing), and rotating keeps norms."""
    torch.manual_seed(0)
    head_dim, L = 32, math.prod(grid)
    cos, sin = M.axial_rope(grid, cell, head_dim)
    q, k = torch.nn.functional.normalize(torch.randn(2, head_dim), dim=-1)
    q_rot, k_rot = M.apply_rope(q.expand(L, -1), cos, sin), M.apply_rope(k.expand(L, -1), cos, sin)
    torch.testing.assert_close(q_rot.norm(dim=-1), torch.ones(L))
    scores = q_rot @ k_rot.T  # (L, L): query at position i, key at position j
    coords = torch.tensor(positions(grid))
    offsets = coords[:, None] - coords[None]  # (L, L, dims)
    for offset in offsets.reshape(-1, len(grid)).unique(dim=0):
        same = scores[(offsets == offset).all(dim=-1)]
        torch.testing.assert_close(same, same[:1].expand_as(same), atol=1e-5, rtol=0)
    assert scores.max() - scores.min() > 0.1  # and positions do change the scores


@pytest.mark.parametrize("grid,factor", [((8,), (2,)), ((4, 6), (2, 3)), ((4, 2, 6), (2, 1, 2))])
def test_token_merge_matches_index_mapping_and_split_inverts_it(grid, factor):
    D, coarse = 3, [g // f for g, f in zip(grid, factor)]
    x = torch.arange(2 * math.prod(grid) * D, dtype=torch.float32).view(2, -1, D)
    expected = torch.empty(2, math.prod(coarse), math.prod(factor) * D)
    for c, big in enumerate(positions(coarse)):  # coarse token c holds its factor block, block offsets row-major
        for o, offset in enumerate(positions(factor)):
            fine = [b * f + off for b, f, off in zip(big, factor, offset)]
            index = sum(p * math.prod(grid[a + 1 :]) for a, p in enumerate(fine))  # row-major flat index
            expected[:, c, o * D : (o + 1) * D] = x[:, index]
    merged = M.merge_tokens(x, grid, factor)
    assert torch.equal(merged, expected)
    assert torch.equal(M.split_tokens(merged, coarse, factor), x)
    merge, split = M.TokenMerge(D, math.prod(factor) * D, factor), M.TokenSplit(math.prod(factor) * D, D, factor)
    with torch.no_grad():  # matching weights: identity projections
        merge.proj.weight.copy_(torch.eye(math.prod(factor) * D))
        split.proj.weight.copy_(torch.eye(math.prod(factor) * D))
    assert torch.equal(split(merge(x, grid), coarse), x)


@pytest.mark.parametrize(
    "kernel,grids",
    [(7, [(256,), (1000,), (4096,)]), (7, [(16, 16), (64, 64), (128, 96)]), (3, [(8, 8, 8), (16, 16, 8)])],
)
def test_neighbourhood_cost_is_linear(kernel, grids):
    """Each query sees exactly kernel^dims keys and each tile reads a halo of the same size on every grid, so the
    gathered keys (tiles x halo) stay below 4 L: cost linear in the number of tokens, no L x L matrix."""
    halos = set()
    for grid in grids:
        queries, keys, mask = M.neighbourhood_tiles(grid, kernel)
        L = math.prod(grid)
        assert (mask.sum(dim=-1) == kernel ** len(grid)).all()
        assert torch.equal(queries.flatten().unique(), torch.arange(L))  # every token is a query
        assert keys.numel() <= 4 * L
        halos.add(keys.shape[1])
    assert len(halos) == 1


@pytest.mark.parametrize(
    "kw,shape",
    [
        (dict(dims=1, in_channels=3), (2, 3, 64)),
        (dict(dims=2, in_channels=3), (2, 3, 16, 24)),
        (dict(dims=3, in_channels=2, kernel=3), (2, 2, 8, 8, 8)),
    ],
)
def test_tiny_forward(kw, shape):
    """Right shape, finite, exactly zero at init (zero-initialised output layer); finite and non-zero once the
    weights move."""
    torch.manual_seed(0)
    model = M.HDiT(**{**M.HDiT.PRESETS["tiny"], **kw})
    x, t = torch.randn(shape), torch.rand(shape[0])
    out = model(x, t)
    assert out.shape == shape and torch.isfinite(out).all() and out.abs().max() == 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = model(x, t)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_wrong_sizes_raise():
    model = M.HDiT(**M.HDiT.PRESETS["tiny"])  # patch 2, merge 2, 2 levels: sides divisible by 4
    with pytest.raises(ValueError, match=r"divisible by patch \* merge\^\(levels-1\) = \(4, 4\)"):
        model(torch.randn(1, 3, 16, 18), torch.rand(1))
    with pytest.raises(ValueError, match=r"needs \(B, C, \*spatial\)"):
        model(torch.randn(1, 3, 16), torch.rand(1))
