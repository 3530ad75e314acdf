"""DiffSeg post-processing: golden values of the original, fast-mode agreement, edge cases.

The golden inputs are regenerated bit-exactly with the numpy generator of
``shared/reference/diffseg_golden.md`` (copied below); the md5s, proposal counts and
intermediate values were produced by the unchanged TensorFlow original.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from diffuseg.methods import diffseg as ds
from diffuseg.methods.diffseg import (
    DiffSegInfo,
    aggregate_attention,
    anchor_grid,
    kmeans_attention,
    merge_proposals,
    pairwise_symmetric_kl,
    proposals_to_labels,
    resolution_weights,
    resolve_matmul_precision,
    segment_attention,
    symmetric_kl,
)

GOLDEN = {
    1.1: ([256, 4, 3], {0: 82303, 1: 130170, 2: 49671}, "75abd59b1bdb26aa95ff5048cfb4602f"),
    0.5: ([256, 4, 4], {0: 82094, 1: 108793, 2: 21640, 3: 49617}, "ddf5d7e63f09ab28537147c78dc3892c"),
}


# ----------------------------------------------------------------------------- golden generator


def layout64():
    lab = np.zeros((64, 64), dtype=np.int64)
    lab[:, 32:] = 1  # right half
    lab[40:, :32] = 2  # bottom-left block
    ii, jj = np.mgrid[0:64, 0:64]
    lab[(ii - 20) ** 2 + (jj - 48) ** 2 < 100] = 3  # disc inside the right half
    return lab


def make_weights(seed=0, scale=1.5, noise=0.3):
    """Self-attention maps of 4 resolutions, (1, 8 heads, s*s, s*s) float64, softmax over keys."""
    rng = np.random.default_rng(seed)
    lab = layout64()
    out = {}
    for s in (64, 32, 16, 8):  # the draw order matters
        r = 64 // s
        lab_s = lab[::r, ::r].reshape(-1)
        F = np.eye(4)[lab_s] * scale + noise * rng.standard_normal((s * s, 4))
        heads = []
        for h in range(8):
            logits = (F @ F.T) * (1.0 + 0.1 * h)
            logits -= logits.max(axis=1, keepdims=True)
            A = np.exp(logits)
            A /= A.sum(axis=1, keepdims=True)
            heads.append(A)
        out[s] = np.stack(heads)[None]
    return out, lab


def small_maps(sizes=(16, 8, 4), batch=1, heads=2, seed=0, classes=3, scale=2.0):
    """Cheap synthetic attention with ``classes`` vertical stripes, float32."""
    rng = np.random.default_rng(seed)
    top = max(sizes)
    out = {}
    for s in sizes:
        cols = (np.arange(s) * classes) // s
        lab = np.broadcast_to(cols, (s, s)).reshape(-1)
        maps = []
        for _ in range(batch):
            feats = np.eye(classes)[lab] * scale + 0.3 * rng.standard_normal((s * s, classes))
            per_head = []
            for h in range(heads):
                logits = feats @ feats.T * (1.0 + 0.2 * h)
                logits -= logits.max(1, keepdims=True)
                a = np.exp(logits)
                per_head.append(a / a.sum(1, keepdims=True))
            maps.append(np.stack(per_head))
        out[s] = np.stack(maps).astype(np.float32)
    assert top in out
    return out


def md5(labels: np.ndarray) -> str:
    return hashlib.md5(labels.astype(np.int64).tobytes()).hexdigest()


def hungarian_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels that agree after the best one-to-one matching of segment ids."""
    n = int(max(a.max(), b.max())) + 1
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (a.reshape(-1), b.reshape(-1)), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return confusion[rows, cols].sum() / a.size


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread: the float16 pass runs thousands of small blocks, which oversubscribed cores
    (tests run beside other jobs) turn from seconds into minutes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def golden_maps():
    return make_weights()[0]


@pytest.fixture(scope="module")
def original_results(golden_maps):
    return {
        thr: segment_attention(
            golden_maps,
            [thr] * 3,
            num_points=16,
            refine=False,
            fidelity="original",
            output_size=512,
            return_info=True,
        )
        for thr in GOLDEN
    }


# ----------------------------------------------------------------------------- golden: original mode


@pytest.mark.parametrize("threshold", sorted(GOLDEN))
def test_original_reproduces_golden_md5(original_results, threshold):
    labels, infos = original_results[threshold]
    counts, pixels, digest = GOLDEN[threshold]
    assert labels.shape == (1, 512, 512) and labels.dtype == np.int64
    assert infos[0].proposal_counts == counts
    ids, n = np.unique(labels[0], return_counts=True)
    assert dict(zip(ids.tolist(), n.tolist(), strict=True)) == pixels
    assert md5(labels[0]) == digest


def test_original_aggregation_matches_golden_intermediates(golden_maps):
    assert resolution_weights([64, 32, 16, 8]).tolist() == pytest.approx(
        [0.5333333333333333, 0.26666666666666666, 0.13333333333333333, 0.06666666666666667], rel=1e-15
    )
    agg = aggregate_attention(golden_maps, fidelity="original")
    assert agg.shape == (1, 4096, 4096) and agg.dtype == np.float64
    a = agg[0].reshape(64, 64, 64, 64)
    sums = a.sum(axis=(2, 3))
    assert sums.min() >= 0.9999999 and sums.max() <= 1.0000002
    assert a.min() == pytest.approx(2.4397e-06, rel=1e-4)
    assert a.sum() == pytest.approx(4096.000267577, rel=1e-8)
    expected = {
        (0, 0, 0, 0): 7.449460681527853e-04,
        (10, 50, 20, 48): 2.6474675905774347e-05,
        (63, 63, 63, 63): 8.418481447733939e-04,
        (33, 7, 45, 12): 1.35063732159324e-04,
    }
    for index, value in expected.items():
        assert a[index] == pytest.approx(value, rel=1e-6)
    fast = aggregate_attention(golden_maps, fidelity="fast")
    assert isinstance(fast, torch.Tensor) and fast.dtype == torch.float32
    np.testing.assert_allclose(fast.numpy(), agg, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- golden: fast mode


@pytest.mark.parametrize("threshold", sorted(GOLDEN))
def test_fast_agrees_with_original_on_golden(golden_maps, original_results, threshold):
    labels, infos = segment_attention(golden_maps, [threshold] * 3, 16, output_size=512, return_info=True)
    reference, reference_infos = original_results[threshold]
    assert infos[0].proposal_counts == reference_infos[0].proposal_counts
    assert len(np.unique(labels)) == len(np.unique(reference)) == len(GOLDEN[threshold][1])
    assert hungarian_agreement(labels[0], reference[0]) >= 0.99


# ----------------------------------------------------------------------------- geometry & pieces


def test_anchor_grid_formula():
    grid = anchor_grid(64, 16)
    assert grid.shape == (256, 2)
    assert np.unique(grid[:, 0]).tolist() == list(range(1, 62, 4))
    assert grid[:3].tolist() == [[1, 1], [1, 5], [1, 9]]  # row-major: the greedy merge order
    assert anchor_grid(16, 1).tolist() == [[7, 7]]
    assert np.unique(anchor_grid(10, 4)[:, 0]).tolist() == [0, 3, 6, 9]
    assert np.unique(anchor_grid(16, 16)[:, 0]).tolist() == list(range(16))
    with pytest.raises(ValueError, match="num_points"):
        anchor_grid(16, 17)


def test_symmetric_kl_matches_definition_and_pairwise():
    rng = np.random.default_rng(1)
    x = rng.dirichlet(np.ones(20), size=5)
    y = rng.dirichlet(np.ones(20), size=7)
    expected = np.array(
        [[0.5 * (np.sum(a * np.log(a / b)) + np.sum(b * np.log(b / a))) for b in y] for a in x]
    )
    np.testing.assert_allclose(symmetric_kl(x[:, None], y[None]), expected, rtol=1e-12)
    torch_kl = symmetric_kl(torch.from_numpy(x)[:, None], torch.from_numpy(y)[None])
    np.testing.assert_allclose(torch_kl.numpy(), expected, rtol=1e-12)
    pairwise = pairwise_symmetric_kl(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    np.testing.assert_allclose(pairwise.numpy(), expected, rtol=1e-4, atol=1e-5)
    zero = np.array([0.0, 1.0])
    assert np.isnan(symmetric_kl(zero, np.array([0.5, 0.5])))  # original: no epsilon
    assert np.isfinite(symmetric_kl(zero, np.array([0.5, 0.5]), eps=1e-12))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10_000))
def test_symmetric_kl_is_symmetric_and_non_negative(n, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.dirichlet(np.ones(n), size=2)
    assert symmetric_kl(x, y) == pytest.approx(symmetric_kl(y, x), abs=1e-12)
    assert symmetric_kl(x, y) >= -1e-12
    assert symmetric_kl(x, x) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fidelity", ["original", "fast"])
def test_merge_is_greedy_and_order_dependent(fidelity):
    # 0 ~ 1 and 1 ~ 2 but not 0 ~ 2: proposal 0 absorbs 1; 2 is still unmatched and takes
    # the mean of itself and the already matched 1.
    base = np.array([[0.70, 0.20, 0.10], [0.55, 0.30, 0.15], [0.40, 0.40, 0.20]])
    kl = symmetric_kl(base[:, None], base[None])
    threshold = (kl[0, 1] + kl[0, 2]) / 2
    assert kl[0, 1] < threshold and kl[1, 2] < threshold < kl[0, 2]
    merged = merge_proposals(base, threshold, fidelity=fidelity)
    merged = merged.numpy() if isinstance(merged, torch.Tensor) else merged
    np.testing.assert_allclose(merged, [base[:2].mean(0), base[1:].mean(0)], rtol=1e-6)
    reversed_merge = merge_proposals(base[::-1].copy(), threshold, fidelity=fidelity)
    reversed_merge = reversed_merge.numpy() if isinstance(reversed_merge, torch.Tensor) else reversed_merge
    np.testing.assert_allclose(reversed_merge, [base[1:].mean(0), base[:2].mean(0)], rtol=1e-6)


@pytest.mark.parametrize("fidelity", ["original", "fast"])
def test_proposals_to_labels_bilinear_argmax_first_wins(fidelity):
    rng = np.random.default_rng(3)
    props = rng.random((4, 8, 8)).astype(np.float32)
    labels = proposals_to_labels(props, 20, fidelity=fidelity)
    up = torch.nn.functional.interpolate(torch.from_numpy(props)[None], size=(20, 20), mode="bilinear")
    assert labels.shape == (20, 20) and labels.dtype == np.int64
    assert (labels == up[0].argmax(0).numpy()).mean() > 0.99
    ties = np.stack([props[0], props[0]])
    assert (proposals_to_labels(ties, 16, fidelity=fidelity) == 0).all()
    assert proposals_to_labels(props.reshape(4, 64), fidelity=fidelity).shape == (8, 8)


# ----------------------------------------------------------------------------- general inputs


@pytest.mark.parametrize("fidelity", ["original", "fast"])
def test_any_resolutions_output_size_and_batch(fidelity):
    maps = small_maps(sizes=(16, 12, 8), batch=2)
    labels, infos = segment_attention(
        maps, [0.5, 0.5], num_points=5, fidelity=fidelity, output_size=37, return_info=True
    )
    assert labels.shape == (2, 37, 37) and labels.dtype == np.int64
    assert all(isinstance(i, DiffSegInfo) and i.proposal_counts[0] == 25 for i in infos)
    for b in range(2):
        single = segment_attention(
            {s: m[b : b + 1] for s, m in maps.items()}, [0.5, 0.5], 5, fidelity=fidelity
        )
        assert single.shape == (1, 16, 16)  # output_size None -> R
        assert labels[b].max() < infos[b].proposals.shape[0]


def test_fast_matches_original_on_small_maps_and_torch_input():
    maps = small_maps(batch=2, seed=4)
    original = segment_attention(maps, [0.3] * 3, 8, fidelity="original", output_size=32)
    fast = segment_attention({s: torch.from_numpy(m) for s, m in maps.items()}, [0.3] * 3, 8, output_size=32)
    for b in range(2):
        assert len(np.unique(fast[b])) == len(np.unique(original[b])) == 3
        assert hungarian_agreement(fast[b], original[b]) >= 0.99


def test_chunk_size_does_not_change_fast_result():
    maps = small_maps(seed=5)
    reference = segment_attention(maps, [0.3] * 3, 8, chunk_size=1024)
    for chunk in (1, 7, 100):
        np.testing.assert_array_equal(segment_attention(maps, [0.3] * 3, 8, chunk_size=chunk), reference)


@pytest.mark.parametrize("fidelity", ["original", "fast"])
def test_relative_thresholds_are_anchor_kl_quantiles(fidelity):
    maps = small_maps(seed=6)
    labels, infos = segment_attention(
        maps, [0.2, 0.2], 8, fidelity=fidelity, threshold_mode="relative", return_info=True
    )
    agg = aggregate_attention(maps, fidelity="original")[0]
    anchors = agg[[r * 16 + c for r, c in anchor_grid(16, 8)]]
    kl = symmetric_kl(anchors[:, None], anchors[None])
    expected = np.quantile(kl[np.triu_indices(len(anchors), 1)], 0.2)
    assert infos[0].thresholds == pytest.approx([expected, expected], rel=1e-3)
    assert 2 <= len(np.unique(labels)) <= infos[0].proposal_counts[-1]


@pytest.mark.parametrize("fidelity", ["original", "fast"])
def test_refinement_runs_and_keeps_segments(fidelity):
    maps = small_maps(seed=7)
    plain = segment_attention(maps, [0.3] * 3, 8, fidelity=fidelity)
    refined, infos = segment_attention(maps, [0.3] * 3, 8, refine=True, fidelity=fidelity, return_info=True)
    assert refined.shape == plain.shape
    assert infos[0].proposals.shape[0] == len(np.unique(refined))
    assert hungarian_agreement(refined[0], plain[0]) >= 0.9


def test_kmeans_baselines():
    maps = small_maps(batch=2, seed=8)
    agg = aggregate_attention(maps)
    constant = kmeans_attention(agg, 3, seed=0, output_size=32)
    specific = kmeans_attention(agg.numpy(), [2, 3], seed=0)
    assert constant.shape == (2, 32, 32) and specific.shape == (2, 16, 16)
    assert len(np.unique(specific[0])) <= 2
    assert hungarian_agreement(constant[0], segment_attention(maps, [0.3] * 3, 8, output_size=32)[0]) > 0.95
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans_attention(agg, [3], seed=0)


# ----------------------------------------------------------------------------- bf16 products


def kl_operands(maps, queries=slice(None)):
    """Anchor (left) and query (right) operands in both precisions, from the fast-mode rows."""
    spec = ds._validate_maps(maps)
    rows = ds._FastRows.build(maps, spec)
    anchors = rows.rows(torch.from_numpy(ds._anchor_indices(spec.top, min(16, spec.top))))
    found = rows.rows(queries)
    return {
        bf16: (
            ds._KLOperand.of(anchors, left=True, bf16=bf16),
            ds._KLOperand.of(found, left=False, bf16=bf16),
        )
        for bf16 in (False, True)
    }, (anchors, found)


def float64_kl(anchors, queries):
    """Exact-ish symmetric KL of the float32 rows (float64 arithmetic, same log clamp)."""
    a, q = anchors.double(), queries.double()
    la, lq = a.clamp_min(ds.FAST_LOG_EPS).log(), q.clamp_min(ds.FAST_LOG_EPS).log()
    entropy = (a * la).sum(-1)[..., :, None] + (q * lq).sum(-1)[..., None, :]
    return 0.5 * (entropy - a @ lq.mT - la @ q.mT)


def test_bf16_kl_error_is_within_its_bound(golden_maps):
    operands, (anchors, queries) = kl_operands(golden_maps, slice(0, 1024))
    kl, bound = ds._bf16_kl(*operands[True])
    error = (kl.double() - float64_kl(anchors, queries)).abs()
    rigorous = bound.double() / ds.KL_BOUND_SAFETY  # the derived bound, without the safety factor
    assert bool((error <= rigorous).all())
    assert error.max() > 1e-3  # bf16 alone is far from float32 accuracy: the bound is needed
    assert float((rigorous / error.clamp_min(1e-30)).min()) < 10  # and it is not vacuous


def near_thresholds(kl32, quantiles=(0.3, 0.5, 0.8), gap=1.5e-5):
    """Thresholds inside dense parts of the KL distribution, each in a gap of the float32 KLs
    wider than ``gap``, so that float32 rounding (~1e-6) cannot decide a pair either way."""
    values = np.sort(kl32.flatten().numpy().astype(np.float64))
    out = []
    for q in quantiles:
        i = int(q * len(values))
        window = values[i : i + 20000]
        widths = np.diff(window)
        j = int(np.argmax(widths >= gap))
        assert widths[j] >= gap
        out.append(float((window[j] + window[j + 1]) / 2))
    return out


@pytest.mark.parametrize("source", ["golden", "small"])
def test_bf16_decisions_equal_float32(golden_maps, source):
    maps = golden_maps if source == "golden" else small_maps(sizes=(32, 16, 8), batch=2, seed=11, classes=4)
    operands, (anchors, queries) = kl_operands(maps, slice(0, 1024))
    left32, right32 = operands[False]
    kl32 = 0.5 * (left32.entropy[..., :, None] + right32.entropy[..., None, :] - left32.cat @ right32.cat.mT)
    exact = float64_kl(anchors, queries)
    thresholds = [1.1, 0.5, *near_thresholds(kl32[0])]
    chunk, flipped = ds.DEFAULT_CHUNK_SIZE, 0
    for q0 in range(0, queries.shape[1], chunk):  # the chunks of segment_attention
        part = queries[:, q0 : q0 + chunk]
        right = {bf16: ds._KLOperand.of(part, left=False, bf16=bf16) for bf16 in (False, True)}
        kl16, _ = ds._bf16_kl(operands[True][0], right[True])
        for tau in thresholds:
            limit = torch.full((queries.shape[0],), tau)
            reference = ds._kl_below(left32, right[False], limit, bf16=False)
            assert torch.equal(reference, exact[:, :, q0 : q0 + chunk] < tau)  # no float32 tie here
            assert torch.equal(ds._kl_below(operands[True][0], right[True], limit, bf16=True), reference)
            flipped += int(((kl16 < tau) != reference).sum())
    assert flipped > 0  # bf16 values alone decide some pairs wrongly; the float32 recompute fixes them


@pytest.mark.parametrize(("source", "threshold"), [("golden", 1.1), ("small", 0.3), ("small", 0.15)])
def test_bf16_and_float32_give_the_same_segmentation(golden_maps, source, threshold):
    maps = golden_maps if source == "golden" else small_maps(batch=2, seed=12)
    kwargs = {
        "kl_threshold": [threshold] * 3,
        "num_points": 16 if source == "golden" else 8,
        "return_info": True,
    }
    labels32, infos32 = segment_attention(maps, matmul_precision="float32", **kwargs)
    labels16, infos16 = segment_attention(maps, matmul_precision="bfloat16", **kwargs)
    np.testing.assert_array_equal(labels16, labels32)
    for info16, info32 in zip(infos16, infos32, strict=True):
        assert info16.proposal_counts == info32.proposal_counts
        np.testing.assert_array_equal(info16.proposals, info32.proposals)


def test_merge_proposals_precisions_agree():
    rng = np.random.default_rng(13)
    centres = rng.dirichlet(np.ones(64) * 0.5, size=4)
    proposals = np.stack([rng.dirichlet(c * 200 + 0.01) for c in centres for _ in range(8)])
    proposals = torch.from_numpy(proposals).float()
    kl = pairwise_symmetric_kl(proposals, proposals)
    threshold = float(kl.flatten().kthvalue(200).values) + 1e-4
    merged = {p: merge_proposals(proposals, threshold, matmul_precision=p) for p in ("float32", "bfloat16")}
    assert torch.equal(merged["float32"], merged["bfloat16"])


def test_matmul_precision_resolution():
    assert resolve_matmul_precision("float32") == torch.float32
    assert resolve_matmul_precision("bfloat16") == torch.bfloat16
    assert resolve_matmul_precision("auto") in (torch.float32, torch.bfloat16)
    assert resolve_matmul_precision("auto", "meta") == torch.float32  # no fast bf16 known there
    assert isinstance(ds._bf16_benchmark(size=32, repeats=1), bool)  # fallback when CPU flags are unknown
    with pytest.raises(ValueError, match="matmul_precision"):
        resolve_matmul_precision("float16")


def test_matched_sums_over_distinct_rows_and_columns():
    rng = np.random.default_rng(14)
    rows = rng.random((6, 40)) < 0.4
    mask = rows[rng.integers(0, 6, 50)]  # 50 anchors, 6 distinct rows, repeated columns
    mask[:, 20:] = mask[:, :20]
    mask[3, 7] ^= True
    first, inverse = ds._distinct_rows(mask)
    assert len(first) == len(np.unique(mask, axis=0)) and (mask[first][inverse] == mask).all()
    hits = torch.from_numpy(np.stack([mask, ~mask]))  # the complement has as few distinct rows
    queries = torch.rand(2, 40, 30)
    sums = torch.zeros(2, 50, 30)
    ds._add_matched_sums(sums, hits, queries)
    np.testing.assert_allclose(sums.numpy(), (hits.double() @ queries.double()).numpy(), rtol=1e-6)
    noisy = torch.from_numpy(rng.random((1, 50, 40)) < 0.5)  # nothing repeats: the plain product
    dense = torch.zeros(1, 50, 30)
    ds._add_matched_sums(dense, noisy, queries[:1])
    np.testing.assert_allclose(dense.numpy(), (noisy.double() @ queries[:1].double()).numpy(), rtol=1e-6)


@pytest.mark.parametrize("side", [5, 8, 12])
def test_key_upsampling_matches_interpolate(side):
    maps = torch.rand(2, side * side, side * side)
    expected = torch.nn.functional.interpolate(
        maps.reshape(-1, 1, side, side), size=(16, 16), mode="bilinear", align_corners=False
    ).reshape(2, side * side, 256)
    torch.testing.assert_close(ds._upsample_keys(maps, 16), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_mode_on_gpu_matches_cpu():
    maps = small_maps(batch=2, seed=9)
    cpu = segment_attention(maps, [0.3] * 3, 8)
    gpu = segment_attention({s: torch.from_numpy(m).cuda() for s, m in maps.items()}, [0.3] * 3, 8)
    assert (gpu == cpu).mean() > 0.99


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: {16: m[16][:, :, :, :200]}, "perfect square|equal query"),
        (lambda m: {8: m[16]}, "side length"),
        (lambda m: {16: m[16][:, 0]}, "heads axis"),
        (lambda m: {16: np.log(m[16])}, "not distributions"),
        (lambda m: {16: m[16], 8: np.concatenate([m[8], m[8]])}, "batch size"),
        (lambda m: {}, "non-empty"),
    ],
)
def test_bad_maps_raise(mutate, message):
    with pytest.raises(ValueError, match=message):
        segment_attention(mutate(small_maps()), [0.3], 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_points": 17}, "num_points"),
        ({"kl_threshold": 1.1}, "list"),
        ({"kl_threshold": []}, "at least one"),
        ({"kl_threshold": [-1.0]}, "> 0"),
        ({"kl_threshold": [1.5], "threshold_mode": "relative"}, r"\(0, 1\)"),
        ({"threshold_mode": "percent"}, "threshold_mode"),
        ({"fidelity": "exact"}, "fidelity"),
        ({"output_size": 0}, "output_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"matmul_precision": "half"}, "matmul_precision"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = {"kl_threshold": [0.3], "num_points": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        segment_attention(small_maps(), **args)
