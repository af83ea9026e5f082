"""Block quantization for ONNX Runtime's `MatMulNBits` (com.microsoft): w = (code − zero_point) · scale per block.

Two ways in:
- from float weights: asymmetric 4-bit, block 32, round-to-nearest with a per-block search over clipped ranges;
- from a GGUF file: each tensor keeps its own quantization grid exactly (llama.cpp's blocks carried over, not
  re-quantized): Q4_0 / Q4_1 / Q4_K as 4-bit (block 32; Q4_1 / Q4_K with float zero points), Q5_0 / Q8_0 as 8-bit
  (block 32) and Q6_K as 8-bit (block 16). ORT 1.32's CPU kernel runs bits 2, 4 and 8 only, so 5- and 6-bit
  grids travel as 8-bit codes — exact, at the cost of bits;
- re-blocked from a GGUF file (`carried_spec(..., reblock=True)`): the 4-bit grids as above, the 8-bit codes
  re-quantized to 8 bits on blocks of 128 (`WIDE_BLOCK`) from the exact values, off by at most 1/510 of a block's
  range: the same kernel runs them ~1.3x faster than on llama.cpp's blocks of 32 or 16 (rows of a multiple of 128
  weights: every Qwen2 size's); the float zero points of Q4_K / Q4_1 folded into the matmul (`QuantSpec.folded`:
  integer zero points, the remainder as 8-bit codes on extra input columns that carry the input's block sums),
  each weight off by at most 1/510 of its group's remainder range, with no extra node per weight; a gathered
  Q4_K table (`gathered_spec`) as 8-bit codes on blocks of 128, since GatherBlockQuantized takes integer zero points.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class QuantSpec:
    bits: int  # 4 or 8
    block: int  # elements per block along K
    float_zp: bool = False  # zero points stored as floats (same type as scales) instead of uint8
    source: str = "rtn"  # "rtn" (re-quantized from floats) or the GGUF type carried over ("Q4_K", ...)
    # float zero points only: stored as the nearest integer zero points plus each block's remainder as 8-bit codes
    # in extra columns of the same MatMulNBits, whose input gets the block sums appended (`Quantized.folded`)
    folded: bool = False

    @property
    def stores_float_zp(self) -> bool:
        """The MatMulNBits zero points are floats (the scales' type), not packed uint8: float zero points not folded."""
        return self.float_zp and not self.folded

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        nb = -(-k // self.block)
        if self.folded:
            nb = folded_blocks(nb, self.block)
        zp = (n * nb,) if (self.stores_float_zp or self.bits == 8) else (n * -(-nb // 2),)
        return {"B": (n, nb, self.block * self.bits // 8), "scales": (n * nb,), "zero_points": zp}


RTN4 = QuantSpec(bits=4, block=32)


@dataclass
class Quantized:
    codes: np.ndarray  # (N, K) uint8
    scales: np.ndarray  # (N, nb) float32
    zero_points: np.ndarray  # (N, nb) uint8 or float32
    spec: QuantSpec

    def dequantize(self) -> np.ndarray:
        if self.spec.folded:
            z, rest = self.folded()
            w = _apply_blocks(self.codes.astype(np.float32), self.spec.block, lambda c, s, z: (c - z) * s,
                              self.scales, z)
            return (w.reshape(w.shape[0], -1, self.spec.block) + rest[..., None]).reshape(w.shape)
        return _apply_blocks(self.codes.astype(np.float32), self.spec.block,
                             lambda c, s, z: (c - z) * s, self.scales, self.zero_points.astype(np.float32))

    def folded(self, parts: bool = False):
        """Float zero points zf as MatMulNBits can run them fast: (q − zf)·s = (q − z)·s + r with z the nearest
        integer (uint8 zero points) and r = (z − zf)·s each block's remainder, which is the weight of the input's
        block sum. The remainders of `block` consecutive blocks of a row (a group) share one 8-bit grid: scale σ,
        zero point Z, codes c, so r ≈ σ·(c − Z), within σ/2 = 1/510 of the group's range (which holds 0).
        Returns (z, the remainders as stored: (N, nb)); with `parts`, (z, c, σ, Z) with c (N, groups, block)."""
        spec = self.spec
        zf = self.zero_points.astype(np.float32)
        z = np.clip(np.round(zf), 0, (1 << spec.bits) - 1).astype(np.float32)
        r = (self.scales * (z - zf)).astype(np.float32)
        n, nb = r.shape
        groups = -(-nb // spec.block)
        rg = np.zeros((n, groups * spec.block), np.float32)
        rg[:, :nb] = r
        rg = rg.reshape(n, groups, spec.block)
        lo, hi = np.minimum(rg.min(-1), 0), np.maximum(rg.max(-1), 0)
        sigma = ((hi - lo) / 255).astype(np.float32)
        sigma = np.where(sigma > 0, sigma, np.float32(1))
        zr = np.clip(np.round(-lo / sigma), 0, 255)
        c = np.clip(np.round(rg / sigma[..., None]) + zr[..., None], 0, 255)
        if parts:
            return z, c.astype(np.uint8), sigma, zr.astype(np.uint8)
        return z, (sigma[..., None] * (c - zr[..., None])).reshape(n, -1)[:, :nb]

    def rows(self, start: int, stop: int) -> "Quantized":
        return Quantized(self.codes[start:stop], self.scales[start:stop], self.zero_points[start:stop], self.spec)

    def pack(self) -> dict[str, np.ndarray]:
        """The three MatMulNBits initializers: B (N, nb, blob), scales (N*nb,), zero_points (packed / float)."""
        spec = self.spec
        n, k = self.codes.shape
        nb = -(-k // spec.block)
        codes = np.zeros((n, nb * spec.block), dtype=np.uint8)
        codes[:, :k] = self.codes
        if spec.bits == 4:
            b = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
        else:
            b = codes
        out = {"B": b.reshape(n, nb, spec.block * spec.bits // 8), "scales": self.scales.reshape(-1)}
        if spec.folded:
            return self._pack_folded(out["B"])
        if spec.float_zp:
            zf = self.zero_points.astype(np.float32)
            out["zero_points"] = zf.reshape(-1)
            # the same codes with the nearest integer zero point z plus a per-block offset: (q − zf)·s =
            # (q − z)·s + (z − zf)·s, so x·wᵀ = MatMulNBits(x, zero points z) + blocksum(x) @ offsets. With z the
            # nearest integer the MatMulNBits part is the weight itself up to half a step per block, so the int8
            # activations of ORT's fast kernel (accuracy level 4) err relative to w, not to a larger (q − 8)·s
            z = np.clip(np.round(zf), 0, (1 << spec.bits) - 1)
            out["zero_points_int"] = _pack_zero_points(z.astype(np.uint8), spec.bits)
            out["offsets"] = (self.scales * (z - zf)).astype(np.float32)
        else:
            out["zero_points"] = _pack_zero_points(self.zero_points.astype(np.uint8), spec.bits)
        return out

    def _pack_folded(self, main: np.ndarray) -> dict[str, np.ndarray]:
        """One MatMulNBits over K + 2·G·block columns: the weight's blocks with integer zero points, then G blocks
        of the remainders' low 4-bit digits (scale σ), then G of their high digits (scale 16·σ), zero points the
        digits of Z; both read the input's block sums (`_folded_input` in export/onnx/linears.py): σ·(c_lo − Z_lo)·Σx
        + 16·σ·(c_hi − Z_hi)·Σx = σ·(c − Z)·Σx."""
        assert self.spec.bits == 4, self.spec
        z, c, sigma, zr = self.folded(parts=True)
        n, groups, block = c.shape
        digits = np.concatenate([c & 15, c >> 4], axis=1)  # (N, 2G, block): low digits' blocks, then high
        b = np.concatenate([main, (digits[..., 0::2] | (digits[..., 1::2] << 4)).astype(np.uint8)], axis=1)
        scales = np.concatenate([self.scales, sigma, 16 * sigma], axis=1).astype(np.float32)
        zps = np.concatenate([z.astype(np.uint8), zr & 15, zr >> 4], axis=1)
        return {"B": b, "scales": scales.reshape(-1), "zero_points": _pack_zero_points(zps, 4)}


def folded_blocks(nb: int, block: int) -> int:
    """Blocks of a folded MatMulNBits row: the weight's nb, then the remainders' low and high digit blocks."""
    return nb + 2 * -(-nb // block)


def unfolded_blocks(nb: int, block: int) -> int:
    """The weight's own blocks in a folded row of nb blocks: folded_blocks' inverse."""
    return next(m for m in range(nb, -1, -1) if folded_blocks(m, block) == nb)


def _pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """(N, nb) uint8 zero points as MatMulNBits stores them: 8-bit ones as they are, 4-bit ones two to a byte (low
    nibble first, each row padded to whole bytes with 8)."""
    n, nb = zp.shape
    if bits == 8:
        return zp.reshape(-1)
    full = np.full((n, -(-nb // 2) * 2), 8, dtype=np.uint8)
    full[:, :nb] = zp
    return (full[:, 0::2] | (full[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def _apply_blocks(x: np.ndarray, block: int, fn, scales: np.ndarray, zps: np.ndarray) -> np.ndarray:
    """fn(x, scale, zero_point) elementwise with per-block parameters (N, nb) broadcast over x (N, K)."""
    n, k = x.shape
    nb = scales.shape[1]
    if nb * block != k:
        pad = np.zeros((n, nb * block), dtype=x.dtype)
        pad[:, :k] = x
        return _apply_blocks(pad, block, fn, scales, zps)[:, :k]
    return fn(x.reshape(n, nb, block), scales[..., None], zps[..., None]).reshape(n, k)


# ---- from float weights ---------------------------------------------------------------------------------------
_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def quantize_rtn(w: torch.Tensor, spec: QuantSpec = RTN4, shrinks: tuple[float, ...] = _SHRINK) -> Quantized:
    """Asymmetric round-to-nearest per block; per block the clipping of [min, max] among `shrinks` with the least
    squared error (shrinks (1.0,): no clipping, every value within half a step of its own)."""
    w = w.detach().to(torch.float32)
    n, k = w.shape
    b = spec.block
    nb = -(-k // b)
    if nb * b != k:
        w = torch.nn.functional.pad(w, (0, nb * b - k))
    blocks = w.reshape(n, nb, b)
    codes = torch.empty(n, nb, b, dtype=torch.uint8)
    scales = torch.empty(n, nb)
    zeros = torch.empty(n, nb, dtype=torch.uint8)
    rows = max(1, (1 << 18) // (nb * b))  # ~1 MB of floats per step: every pass below stays in cache
    for r in range(0, n, rows):
        q, s, z = _rtn_rows(blocks[r:r + rows], (1 << spec.bits) - 1, shrinks)
        codes[r:r + rows], scales[r:r + rows], zeros[r:r + rows] = q, s, z
    return Quantized(codes.reshape(n, nb * b)[:, :k].numpy(), scales.numpy(), zeros.numpy(), spec)


def _rtn_rows(x: torch.Tensor, qmax: int,
              shrinks: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, z = _fit_blocks(x, qmax, None, shrinks)
    q = torch.round(x / s[..., None] + z[..., None]).clamp_(0, qmax)
    return q.to(torch.uint8), s, z.to(torch.uint8)


# ---- calibrated: weighted by what the layer's inputs look like -------------------------------------------------
def _fit_blocks(x: torch.Tensor, qmax: int, h: torch.Tensor | None,
                shrinks: tuple[float, ...] = _SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of `x` (rows, nb, b): the (scale, zero point) of the clipping in `shrinks` with the least error,
    squared error weighted per column by `h` (nb, b) (the input's mean square: an error on a column the layer
    sees large inputs on costs more). h None: unweighted."""
    lo = x.amin(-1).clamp(max=0.0)
    hi = x.amax(-1).clamp(min=0.0)
    best_err = best_s = best_z = None
    for f in shrinks:
        s = ((hi - lo) * (f / qmax)).clamp_(min=1e-12)
        z = torch.round(-lo * f / s).clamp_(0, qmax)
        q = (torch.round(x / s[..., None] + z[..., None]).clamp_(0, qmax) - z[..., None]) * s[..., None] - x
        q.square_()
        err = (q * h).sum(-1) if h is not None else q.sum(-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def quantize_weighted(w: torch.Tensor, spec: QuantSpec, h_diag: torch.Tensor) -> Quantized:
    """Round-to-nearest whose per-block clipping minimizes the output error Σ_k E[x_k²]·Δw_k² instead of the
    weight error: `h_diag` (K,) is the calibration inputs' mean square per input column."""
    w = w.detach().to(torch.float32)
    n, k = w.shape
    b, qmax = spec.block, (1 << spec.bits) - 1
    nb = -(-k // b)
    h = torch.nn.functional.pad(h_diag.to(torch.float32), (0, nb * b - k)).reshape(nb, b)
    blocks = torch.nn.functional.pad(w, (0, nb * b - k)).reshape(n, nb, b)
    codes = torch.empty(n, nb, b, dtype=torch.uint8)
    scales, zeros = torch.empty(n, nb), torch.empty(n, nb, dtype=torch.uint8)
    rows = max(1, (1 << 18) // (nb * b))
    for r in range(0, n, rows):
        x = blocks[r:r + rows]
        s, z = _fit_blocks(x, qmax, h)
        codes[r:r + rows] = torch.round(x / s[..., None] + z[..., None]).clamp_(0, qmax).to(torch.uint8)
        scales[r:r + rows], zeros[r:r + rows] = s, z.to(torch.uint8)
    return Quantized(codes.reshape(n, nb * b)[:, :k].numpy(), scales.numpy(), zeros.numpy(), spec)


GPTQ_DAMP = 0.01  # fraction of the mean diagonal added to the Hessian (GPTQ's default)
GPTQ_PANEL = 128  # columns updated together (a multiple of every block size used here)
GPTQ_ROWS = 16384  # rows swept together: given H, rows are independent, and a panel of this many stays in cache


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """U, the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U, positive diagonal). With J the reversal of the order,
    J H J = L Lᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper triangular: one Cholesky and one
    triangular solve, about half the work of a Cholesky, the inverse from it and a Cholesky of that."""
    low = torch.linalg.cholesky(h.flip(0, 1))
    return torch.linalg.solve_triangular(low, torch.eye(h.shape[0], dtype=h.dtype), upper=False).flip(0, 1)


def quantize_gptq(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor, act_order: bool = False,
                  shrinks: tuple[float, ...] = _SHRINK) -> Quantized:
    """GPTQ (Frantar et al. 2022): columns quantized one at a time, each one's rounding error pushed onto the
    columns not yet quantized through the inverse of H = E[x xᵀ] (`hessian`, (K, K), from calibration inputs),
    so that the rounding minimizes the layer's output error, not the weight error.

    Without `act_order` the sweep runs left to right and each block's scale and zero point are fitted (clipping
    search weighted by diag H) when the sweep reaches it, on the weights as earlier errors have updated them.
    With `act_order` the sweep takes the columns with the largest inputs first (H's diagonal, descending) — their
    error then lands on the many columns still free — and the blocks' parameters are fitted beforehand ("static
    groups"), since MatMulNBits' blocks are runs of consecutive columns that the reordered sweep visits piecemeal."""
    return gptq(w, spec, hessian, act_order, shrinks)[0]


def gptq(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor, act_order: bool = False,
         shrinks: tuple[float, ...] = _SHRINK) -> tuple[Quantized, torch.Tensor, torch.Tensor]:
    """`quantize_gptq`, and per row its output error ΔW H ΔWᵀ and output power W H Wᵀ (N,) on the calibration
    inputs. The error comes from the sweep's own errors: with E the scaled errors (err_i = (w_i − q_i) / U_ii as
    each column is rounded), ΔW = E U, so ΔW (H + λI) ΔWᵀ = E Eᵀ, and the damping's λ‖ΔW‖² is taken off.
    `w` may be anything that answers `w[r0:r1]` with those rows (a checkpoint's, read a slice at a time)."""
    n, k = w.shape
    b = spec.block
    if k % b or GPTQ_PANEL % b:
        raise ValueError(f"GPTQ needs whole blocks: K={k}, block {b}")
    h_in = hessian.to(torch.float32)
    H = h_in.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    hdiag = torch.diagonal(H).clone()
    nb = k // b
    order = torch.argsort(hdiag, descending=True) if act_order else torch.arange(k)
    if act_order:
        H = H[order][:, order]
    damp = GPTQ_DAMP * float(hdiag.mean())
    H.diagonal().add_(damp)
    U = _inverse_factor(H)  # row i: how column i's error spreads over the later columns
    del H
    codes = np.empty((n, k), dtype=np.uint8)
    scales, zeros = np.empty((n, nb), dtype=np.float32), np.empty((n, nb), dtype=np.uint8)
    row_err, row_power = torch.empty(n), torch.empty(n)
    for r0 in range(0, n, GPTQ_ROWS):
        r1 = min(n, r0 + GPTQ_ROWS)
        w0 = w[r0:r1].detach().to(torch.float32)  # read once (a checkpoint's rows are dequantized per read)
        wr = w0.clone()
        wr[:, dead] = 0.0
        c, sT, zT, e2 = _sweep(wr, U, spec, hdiag, order if act_order else None, shrinks)
        codes[r0:r1], scales[r0:r1], zeros[r0:r1] = c.T.numpy(), sT.T.numpy(), zT.T.to(torch.uint8).numpy()
        q = Quantized(codes[r0:r1], scales[r0:r1], zeros[r0:r1], spec)
        dw = torch.from_numpy(q.dequantize()) - w0
        dw[:, dead] = 0.0  # rounded as zeros (no input ever reaches them)
        row_err[r0:r1] = e2 - damp * dw.square_().sum(1)
        row_power[r0:r1] = ((w0 @ h_in) * w0).sum(1)
    return Quantized(codes, scales, zeros, spec), row_err.clamp_(min=0.0), row_power


def _sweep(w: torch.Tensor, U: torch.Tensor, spec: QuantSpec, hdiag: torch.Tensor, order: torch.Tensor | None,
           shrinks: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's sweep over rows `w` (n, K) (updated in place): codes (K, n) transposed like each panel (a column's
    codes are one row), scales and zero points (nb, n), and per row the sum of the squared scaled errors."""
    n, k = w.shape
    b, qmax = spec.block, (1 << spec.bits) - 1
    nb = k // b
    sT, zT = torch.empty(nb, n), torch.empty(nb, n)  # per block, its scale and zero point for every row
    if order is not None:  # static groups: fitted on the weights before the sweep, then the columns reordered
        s, z = _fit_blocks(w.reshape(-1, nb, b), qmax, hdiag.reshape(nb, b), shrinks)
        sT[:], zT[:] = s.T, z.T
        w = w[:, order]
    cols = order.tolist() if order is not None else list(range(k))
    blk = [c // b for c in cols]  # the swept columns and their blocks, as Python ints
    codes = torch.empty(k, n, dtype=torch.uint8)
    e2 = torch.zeros(n)
    for p0 in range(0, k, GPTQ_PANEL):
        p1 = min(k, p0 + GPTQ_PANEL)
        W1 = w[:, p0:p1].T.contiguous()  # (panel, n): each column a contiguous row, updated in place
        E1 = torch.empty_like(W1)
        U1 = U[p0:p1, p0:p1]
        for i in range(p1 - p0):
            col = p0 + i
            if order is None and col % b == 0:
                s, z = _fit_blocks(W1[i:i + b].T.unsqueeze(1), qmax, hdiag[col:col + b].unsqueeze(0), shrinks)
                sT[col // b], zT[col // b] = s[:, 0], z[:, 0]
            s_col, z_col = sT[blk[col]], zT[blk[col]]
            q = torch.round(W1[i] / s_col + z_col).clamp_(0, qmax)
            codes[cols[col]] = q.to(torch.uint8)
            err = E1[i]
            torch.sub(W1[i], (q - z_col) * s_col, out=err).div_(U1[i, i])
            if i + 1 < p1 - p0:
                W1[i + 1:].sub_(torch.outer(U1[i, i + 1:], err))
        e2 += E1.square().sum(0)
        w[:, p1:] -= E1.T @ U[p0:p1, p1:]
    return codes, sT, zT, e2


def output_error(w: torch.Tensor, q: Quantized, hessian_or_diag: torch.Tensor, rows: int = 16384) -> float:
    """Relative output error of quantized weights on the calibration inputs: E‖ΔW x‖² / E‖W x‖², from H = E[x xᵀ]
    (or its diagonal alone, which ignores correlations between input columns). A slice of `rows` rows at a time:
    whole, the LM head's temporaries would be several fp32 copies of it."""
    h = hessian_or_diag.to(torch.float32)

    def power(x: torch.Tensor) -> float:  # Σ x H xᵀ over the rows of x
        return float((x.square() @ h).sum()) if h.dim() == 1 else float(((x @ h) * x).sum())

    num = den = 0.0
    for r in range(0, w.shape[0], rows):
        wr = w[r:r + rows].detach().to(torch.float32)
        num += power(torch.from_numpy(q.rows(r, r + rows).dequantize()) - wr)
        den += power(wr)
    return num / max(den, 1e-30)


# ---- carried over from GGUF blocks -----------------------------------------------------------------------------
# type -> (bytes per super-block, elements per super-block, MatMulNBits spec)
GGUF_EXACT = {
    "Q8_0": (34, 32, QuantSpec(8, 32, source="Q8_0")),
    "Q5_0": (22, 32, QuantSpec(8, 32, source="Q5_0")),
    "Q4_0": (18, 32, QuantSpec(4, 32, source="Q4_0")),
    "Q4_1": (20, 32, QuantSpec(4, 32, float_zp=True, source="Q4_1")),
    "Q4_K": (144, 256, QuantSpec(4, 32, float_zp=True, source="Q4_K")),
    "Q6_K": (210, 256, QuantSpec(8, 16, source="Q6_K")),
}


# ORT 1.32's CPU MatMulNBits (int8 activations) at one row: 8-bit codes on blocks of 128 as fast as 4-bit ones on
# blocks of 32 and ~1.3x faster than 8-bit ones on blocks of 32 (bench/matmulnbits.py). 128 divides every Qwen2
# hidden and intermediate size; a row it does not divide (tiny test configs) keeps the file's blocks, since a
# gathered embedding row would come out padded.
WIDE_BLOCK = 128


def carried_spec(gtype: str, reblock: bool, row: int) -> QuantSpec:
    """How a GGUF tensor of type `gtype` with rows of `row` weights travels: its exact blocks, or with `reblock`
    its 8-bit codes (Q5_0, Q8_0, Q6_K) re-quantized to 8 bits on blocks of WIDE_BLOCK where that divides the row
    and its float zero points (Q4_K, Q4_1) folded (`QuantSpec.folded`); the 4-bit codes stay the file's."""
    spec = GGUF_EXACT[gtype][2]
    if reblock and spec.float_zp:
        return dataclasses.replace(spec, folded=True)
    return QuantSpec(8, WIDE_BLOCK, source=gtype) if reblock and spec.bits == 8 and row % WIDE_BLOCK == 0 else spec


def gathered_spec(spec: QuantSpec, row: int) -> QuantSpec:
    """The form of a table that is also gathered (an embedding, or a head tied to it): `GatherBlockQuantized` takes
    uint8 zero points only, so a folded spec (float zero points under `reblock`) travels as 8-bit codes on blocks of
    WIDE_BLOCK, each weight within 1/510 of its block's range as the recipe's other wide tensors, where that divides
    the row; otherwise, and for every other spec, as it is."""
    if not spec.folded:
        return spec
    return QuantSpec(8, WIDE_BLOCK, source=spec.source) if row % WIDE_BLOCK == 0 else dataclasses.replace(spec, folded=False)


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    return raw[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _q4k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's 6-bit packed (scale, min) pairs of Q4_K: 12 bytes -> 8 sub-block scales and mins."""
    sc = sc.astype(np.uint8)
    s = np.empty(sc.shape[:-1] + (8,), dtype=np.uint8)
    m = np.empty_like(s)
    s[..., :4] = sc[..., 0:4] & 63
    m[..., :4] = sc[..., 4:8] & 63
    s[..., 4:] = (sc[..., 8:12] & 0xF) | ((sc[..., 0:4] >> 6) << 4)
    m[..., 4:] = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return s.astype(np.float32), m.astype(np.float32)


def _float_zp(scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w = scale·q − offset as (q − zp)·scale. A zero-scale block is the constant −offset: scale 1, zp = offset."""
    zero = scale == 0
    scale = np.where(zero, 1.0, scale).astype(np.float32)
    return scale, np.where(zero, offset, offset / scale).astype(np.float32)


def gguf_block_params(gtype: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block (scale, zero point) of a GGUF tensor; raw (rows, bytes). Returns two (rows, nb) float32 arrays."""
    size, per, spec = GGUF_EXACT[gtype]
    rows = raw.shape[0]
    sb = raw.reshape(rows, -1, size)  # (rows, super-blocks, bytes)
    if gtype == "Q8_0":
        d = _f16(sb, 0)
        return d, np.full_like(d, 128.0)
    if gtype == "Q5_0":
        d = _f16(sb, 0)
        return d, np.full_like(d, 16.0)
    if gtype == "Q4_0":
        d = _f16(sb, 0)
        return d, np.full_like(d, 8.0)
    if gtype == "Q4_1":
        d, m = _f16(sb, 0), _f16(sb, 2)
        return _float_zp(d, -m)
    if gtype == "Q6_K":
        d = _f16(sb, 208)
        sc = sb[..., 192:208].view(np.int8).astype(np.float32)  # (rows, sbk, 16)
        scale = (d[..., None] * sc).reshape(rows, -1)
        return scale, np.full_like(scale, 32.0)
    if gtype == "Q4_K":
        d, dmin = _f16(sb, 0), _f16(sb, 2)
        s, m = _q4k_scale_min(sb[..., 4:16])
        scale = (d[..., None] * s).reshape(rows, -1)
        offset = (dmin[..., None] * m).reshape(rows, -1)
        return _float_zp(scale, offset)
    raise KeyError(gtype)


def quantize_reblocked(w: torch.Tensor, spec: QuantSpec) -> Quantized:
    """A GGUF tensor's exact values `w` (rows, K) on `carried_spec`'s re-blocked 8-bit grid: round-to-nearest,
    unclipped, so every weight is within half a step (1/510 of its block's range, which holds 0) of its own."""
    assert spec.bits == 8 and spec.block == WIDE_BLOCK, spec
    return quantize_rtn(w, spec, shrinks=(1.0,))


def quantize_from_gguf(gtype: str, raw: np.ndarray, w: np.ndarray, spec: QuantSpec | None = None) -> Quantized:
    """Carry a GGUF tensor's blocks over: codes recovered from the dequantized values `w` (rows, K) and the block
    parameters read from `raw`; checked to reproduce `w`. A folded spec (`carried_spec` under `reblock`, float zero
    points) carries the same blocks and says how they are stored; any other spec than the exact one is re-blocked
    8-bit (`quantize_reblocked`)."""
    folded = spec is not None and spec.folded
    if spec is not None and not folded and spec != GGUF_EXACT[gtype][2]:
        return quantize_reblocked(torch.from_numpy(w), spec)
    spec = GGUF_EXACT[gtype][2]
    scale, zp = gguf_block_params(gtype, raw)
    safe = np.where(scale != 0, scale, 1.0).astype(np.float32)
    codes = _apply_blocks(w, spec.block, lambda x, s, z: np.round(x / s + z), safe, zp)
    codes = np.clip(codes, 0, (1 << spec.bits) - 1).astype(np.uint8)
    zp_out = zp.astype(np.float32) if spec.float_zp else zp.astype(np.uint8)
    q = Quantized(codes, scale.astype(np.float32), zp_out, spec)
    err = np.abs(q.dequantize() - w).max() if w.size else 0.0
    if not err <= 1e-5 * max(1.0, float(np.abs(w).max())):
        raise ValueError(f"{gtype} blocks could not be carried over exactly (max error {err:.3g})")
    return dataclasses.replace(q, spec=dataclasses.replace(spec, folded=True)) if folded else q
