"""Triton kernel for the 2:4 sparse Linear: y = x W^T + bias, reading W in its compressed form.

W [N, K] is stored as values [N, K/2] (the two kept entries of each group of 4 input features, in column order)
and meta uint8 [N, K/8] (byte j of a row: bits 0-1 / 2-3 = positions of the two kept entries of group 2j, bits
4-5 / 6-7 the same for group 2j+1); see `madtp_kernels.reference.sparse`. The kernel loads a tile of values and
meta (about 56% of the dense fp16 tile's bytes), expands it to the dense W tile in registers and feeds
`tl.dot`. That saving only pays where the GEMM is bound by the weight read, i.e. few tokens; the dispatcher
sends large token counts to cuSPARSELt, but this kernel stays correct (and reasonably tiled) for any M.

The launcher receives inputs that `madtp_kernels.sparse` has already validated: x [M, K], values, meta and bias
contiguous on one device (CUDA, or CPU under TRITON_INTERPRET=1), x/values/bias of one dtype, K % 8 == 0.
Row offsets are int64: M * K and N * K may exceed 2**31.

The product is computed as y^T = W x^T: the expanded W tile [BLOCK_N, BLOCK_K] is the first `tl.dot` operand,
so the tensor-core M dimension (16 per mma.sync, 64 per Hopper wgmma) is spent on out_features, not on the
handful of tokens; on sm_90 the wgmma then takes the expanded tile straight from registers (x^T from shared
memory), while on sm_80 the tile makes one round trip through shared memory into the mma operand layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import AotSpec


@dataclass(frozen=True)
class _Tile:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (largest M, tile), smallest first. Few tokens (M <= 64) is the regime this kernel is for: the weight read
# dominates, so one token tile covers all of M (each weight tile is read and expanded once), BLOCK_N = 64 keeps
# the program count up (768 out_features -> 12 column tiles) and split-K fills the rest of the machine.
# BLOCK_K = 128 at M <= 16 moves 8 KiB of fp16 values per stage; at M <= 64 BLOCK_K = 64 keeps the 64 x 64
# fp32 accumulator and the operands within 128 registers. Many tokens (normally sent to cuSPARSELt) get an
# ordinary compute-bound 128 x 128 tile. All three compile without spills on sm_80 and sm_90 (tools.aot);
# none of these choices has been timed on a GPU yet.
_HALF_TILES = ((16, _Tile(16, 64, 128, 4, 3)), (64, _Tile(64, 64, 64, 4, 3)), (None, _Tile(128, 128, 64, 8, 3)))
# fp32 runs the exact ("ieee") dot on FMA units, whose operands live in registers: BLOCK_K = 32 keeps them
# spill-free; past 16 tokens one 64 x 64 tile serves every M.
_FP32_TILES = ((16, _Tile(16, 64, 32, 4, 2)), (None, _Tile(64, 64, 32, 4, 2)))
_SPLIT_K_MAX_M = 64
# Split-K aims at this many programs per SM. Each split writes and re-reads an fp32 partial of 8 * M bytes per
# output feature; splits are capped so that this traffic stays below the compressed weight's bytes, and each
# split keeps at least _MIN_K_STEPS_PER_SPLIT K steps.
_PROGRAMS_PER_SM = 2
_MIN_K_STEPS_PER_SPLIT = 4
_DEFAULT_SMS = 132  # H100 SXM; stands in when the tensors are not on a GPU (the interpreter)
_REDUCE_BLOCK = 1024


@triton.jit
def _expand_2to4(values, meta, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """values [BLOCK_N, BLOCK_K/2], meta uint8 [BLOCK_N, BLOCK_K/8] -> the dense tile [BLOCK_N, BLOCK_K].

    Built from 2-D [BLOCK_N, BLOCK_K/4] pieces (one per position in the group) joined along new minor dims:
    join/split/reshape on a minor dim keep each thread's elements in its own registers, whereas a 3-D
    `where` over a broadcast position axis lets the compiler spread the 4 positions over 4 lanes, each holding
    copies of both values (tools.aot, fp16 16 x 64 x 128 tile on sm_80: 212 registers against 126).
    """
    first, second = tl.split(tl.reshape(values, [BLOCK_N, BLOCK_K // 4, 2]))
    # One nibble per group of 4 columns: the low nibble of a byte is the even group.
    nibble = tl.reshape(tl.join(meta & 0xF, meta >> 4), [BLOCK_N, BLOCK_K // 4])
    pos0 = nibble & 3
    pos1 = nibble >> 2
    zero = tl.zeros_like(first)
    # pos0 < pos1, so position 0 can only hold the first value and position 3 only the second.
    w0 = tl.where(pos0 == 0, first, zero)
    w1 = tl.where(pos0 == 1, first, tl.where(pos1 == 1, second, zero))
    w2 = tl.where(pos0 == 2, first, tl.where(pos1 == 2, second, zero))
    w3 = tl.where(pos1 == 3, second, zero)
    # join(join(w0, w2), join(w1, w3))[n, g, i, j] is w_(2i + j): flattening (g, i, j) gives column 4g + p.
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_N, BLOCK_K])


@triton.jit
def _sparse_linear_kernel(x_ptr, values_ptr, meta_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
                          HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (token block, column block, K split) computes out[m, n] for its tiles over its K range.

    SPLIT_K: out is an fp32 workspace [splits, M, N] of partial sums (bias is added by the reduction);
    otherwise out is y [M, N] and the program adds bias and casts to y's dtype. k_per_split is a multiple
    of BLOCK_K, so only the last K step of the whole row can be partial.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows_m < M
    n_ok = rows_n < N
    x_rows = x_ptr + rows_m.to(tl.int64)[:, None] * K
    values_rows = values_ptr + rows_n.to(tl.int64)[:, None] * (K // 2)
    meta_rows = meta_ptr + rows_n.to(tl.int64)[:, None] * (K // 8)
    cols_x = tl.arange(0, BLOCK_K)
    cols_v = tl.arange(0, BLOCK_K // 2)
    cols_meta = tl.arange(0, BLOCK_K // 8)

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # Triton pipelines x and values through shared memory (cp.async / TMA), but a thread's share of a meta
    # tile is under the 4 bytes cp.async moves, so meta is prefetched by hand one K step ahead in registers.
    # K % 8 == 0, so a partial step still holds whole groups and whole meta bytes: masking all three loads at
    # K (and at k_end for meta, whose prefetch runs one step past the range) keeps them aligned. Masked meta
    # and values read 0: the tile is 0.
    meta_end = k_end // 8
    next_meta = tl.load(meta_rows + (k_start // 8 + cols_meta)[None, :],
                        mask=n_ok[:, None] & (k_start // 8 + cols_meta < meta_end)[None, :], other=0)
    for k0 in range(k_start, k_end, BLOCK_K):
        meta = next_meta
        meta_cols = (k0 + BLOCK_K) // 8 + cols_meta
        next_meta = tl.load(meta_rows + meta_cols[None, :], mask=n_ok[:, None] & (meta_cols < meta_end)[None, :],
                            other=0)
        x = tl.load(x_rows + (k0 + cols_x)[None, :], mask=m_ok[:, None] & (k0 + cols_x < K)[None, :], other=0.0)
        values = tl.load(values_rows + (k0 // 2 + cols_v)[None, :],
                         mask=n_ok[:, None] & (k0 // 2 + cols_v < K // 2)[None, :], other=0.0)
        w = _expand_2to4(values, meta, BLOCK_N, BLOCK_K)
        # "ieee" matters only for fp32 inputs (no silent TF32); fp16/bf16 run on tensor cores either way.
        acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")

    out_offsets = rows_m.to(tl.int64)[None, :] * N + rows_n[:, None]
    out_mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K:
        out_offsets += pid_k.to(tl.int64) * M * N
        tl.store(out_ptr + out_offsets, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_k_reduce_kernel(partial_ptr, bias_ptr, y_ptr, M, N, splits, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr):
    """y = sum over splits of partial [splits, M, N] (fp32), + bias, cast: a fixed order, so deterministic."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    size = M.to(tl.int64) * N
    ok = offsets < size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(partial_ptr + s * size + offsets, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offsets % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def _tiles(dtype: torch.dtype) -> tuple[tuple[int | None, _Tile], ...]:
    return _FP32_TILES if dtype == torch.float32 else _HALF_TILES


def _plan(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> tuple[_Tile, int, int]:
    """(tile, number of K splits, K columns per split) for this problem."""
    tile = next(t for max_m, t in _tiles(dtype) if max_m is None or M <= max_m)
    k_steps = triton.cdiv(K, tile.block_k)
    splits = 1
    if M <= _SPLIT_K_MAX_M:
        wanted = triton.cdiv(_PROGRAMS_PER_SM * _num_sms(device), triton.cdiv(N, tile.block_n))
        weight_row_bytes = K // 2 * dtype.itemsize + K // 8
        splits = max(1, min(wanted, k_steps // _MIN_K_STEPS_PER_SPLIT, weight_row_bytes // (8 * M)))
    k_per_split = triton.cdiv(k_steps, splits) * tile.block_k
    # Rounding k_per_split up to whole K steps may leave fewer splits, none of them empty.
    return tile, max(1, triton.cdiv(K, k_per_split)), k_per_split


def sparse_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K], values [N, K/2], meta uint8 [N, K/8], bias [N] or None -> y [M, N] = x W^T + bias.

    Accumulates in fp32 and returns x's dtype. With split-K the partial sums go through an fp32 workspace and
    a second kernel sums them in a fixed order: the result is deterministic (bitwise run to run).
    """
    M, K = x.shape
    N = values.shape[0]
    y = x.new_empty((M, N))
    if y.numel() == 0:
        return y
    tile, splits, k_per_split = _plan(M, N, K, x.dtype, x.device)
    has_bias = bias is not None
    bias_arg = bias if has_bias else values  # any valid pointer: HAS_BIAS=False compiles the load out
    out = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else y
    grid = (triton.cdiv(M, tile.block_m), triton.cdiv(N, tile.block_n), splits)
    _sparse_linear_kernel[grid](x, values, meta, bias_arg, out, M, N, K, k_per_split,
                                HAS_BIAS=has_bias, SPLIT_K=splits > 1,
                                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                                num_warps=tile.num_warps, num_stages=tile.num_stages)
    if splits > 1:
        _split_k_reduce_kernel[(triton.cdiv(M * N, _REDUCE_BLOCK),)](
            out, bias_arg, y, M, N, splits, HAS_BIAS=has_bias, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return y


def _aot_specs() -> list[AotSpec]:
    specs = []
    # Torch allocations are 16-byte aligned; ViT/BLIP feature sizes (768, 1024, 3072, 4096) are multiples of
    # 16 in both N and K, and k_per_split is a multiple of BLOCK_K. M (the token count) is not.
    aligned = ("x_ptr", "values_ptr", "meta_ptr", "out_ptr", "N", "K", "k_per_split")
    for dt, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        signature = {"x_ptr": f"*{dt}", "values_ptr": f"*{dt}", "meta_ptr": "*u8", "bias_ptr": f"*{dt}",
                     "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32"}
        smallest_m = 1
        for max_m, tile in _tiles(dtype):
            blocks = {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k}
            size = f"M<={max_m}" if max_m is not None else f"M>={smallest_m}"
            # A tile serving some M <= _SPLIT_K_MAX_M is also launched with split-K.
            for split in (False, True) if smallest_m <= _SPLIT_K_MAX_M else (False,):
                specs.append(AotSpec(
                    _sparse_linear_kernel, {**signature, "out_ptr": "*fp32" if split else f"*{dt}"},
                    {"HAS_BIAS": not split, "SPLIT_K": split, **blocks},
                    num_warps=tile.num_warps, num_stages=tile.num_stages, divisible_by_16=aligned,
                    label=f"{dt} {size} {tile.block_m}x{tile.block_n}x{tile.block_k}" + " split-K" * split))
            smallest_m = (max_m or 0) + 1
        specs.append(AotSpec(
            _split_k_reduce_kernel,
            {"partial_ptr": "*fp32", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}", "M": "i32", "N": "i32",
             "splits": "i32"},
            {"HAS_BIAS": True, "BLOCK": _REDUCE_BLOCK}, num_warps=4,
            divisible_by_16=("partial_ptr", "y_ptr", "N"), label=dt))
    return specs


AOT_SPECS = _aot_specs()
