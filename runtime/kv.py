"""The KV cache: device buffers allocated once, bound to the graph's past inputs and present outputs by pointer.

Two modes, by what the graph's attention does with the cache:

- shared (GroupQueryAttention in every layer, the fused lowering): one (B, kv, capacity, hd) buffer per layer
  tensor, bound as both past and present with its full shape. ONNX Runtime's GroupQueryAttention sizes present as
  max(past length, total length) and, seeing past and present at the same address, writes only the new positions
  in place (onnxruntime-genai's `past_present_share_buffer`); it reads each row's first `total` positions, told by
  the attention mask's length. Nothing is copied and the bindings never change, so they are made once.
- ping-pong (any other graph: `present = Concat(past, new)`, so past and present cannot be one buffer): two flat
  buffers per layer tensor; a step binds past to one and present to the other, ONNX Runtime writes `past + new`
  straight into it, and the next step swaps the two. Flat, because the first B·kv·T·hd elements of a flat buffer
  are a contiguous (B, kv, T, hd) tensor for every T, so no step allocates, reshapes or copies on the host.

On CUDA the buffers live on the GPU and never visit the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Buffer:
    """`n` elements of `dtype` on a device; `host` is the same memory as a numpy array when the device is the CPU."""
    ptr: int
    n: int
    keep: object  # the numpy array or OrtValue that owns the memory
    host: np.ndarray | None


def alloc(n: int, dtype: np.dtype, device: str, device_id: int = 0) -> Buffer:
    if device == "cpu":
        a = np.zeros(n, dtype=dtype)
        return Buffer(a.ctypes.data, n, a, a)
    import onnxruntime as ort

    ov = ort.OrtValue.ortvalue_from_shape_and_type([n], dtype, device, device_id)
    return Buffer(ov.data_ptr(), n, ov, None)


class KVCache:
    def __init__(self, past_names: list[str], present_names: list[str], batch: int, kv_heads: int, head_dim: int,
                 capacity: int, dtype: np.dtype, device: str, device_id: int = 0, shared: bool = False):
        self.past_names, self.present_names = past_names, present_names
        self.batch, self.kv_heads, self.head_dim, self.capacity = batch, kv_heads, head_dim, capacity
        self.dtype, self.device, self.device_id, self.shared = np.dtype(dtype), device, device_id, shared
        n = batch * kv_heads * capacity * head_dim
        copies = 1 if shared else 2
        self.bufs = [tuple(alloc(n, dtype, device, device_id) for _ in range(copies)) for _ in past_names]
        self.lengths = np.zeros(batch, dtype=np.int64)  # tokens cached per row (including left padding)
        self.cur = 0  # ping-pong: which buffer of each pair holds the cache (shared: always 0)
        self._bound = None  # shared: (IO binding, first row, rows) or (binding, None) this cache's buffers hold

    @property
    def length(self) -> int:
        """Tokens cached in the longest row (every row, unless rows were filled one by one: `bind_row`)."""
        return int(self.lengths.max())

    @property
    def nbytes(self) -> int:
        return len(self.bufs) * len(self.bufs[0]) * self.bufs[0][0].n * self.dtype.itemsize

    def fits(self, batch: int, tokens: int) -> bool:
        return batch == self.batch and tokens <= self.capacity

    def reset(self) -> None:
        self.lengths[:], self.cur = 0, 0

    def bind(self, io, new_tokens: int) -> None:
        """Bind past (the cached tokens) and present (past + `new_tokens`) for the next step. The caller must not
        clear the binding's inputs or outputs between steps: binding a name again replaces the old binding, and
        shared mode binds only once per IO binding."""
        total = self.length + new_tokens
        assert total <= self.capacity, (total, self.capacity)
        if self.shared:
            if self._bound != (io, None):
                full = [self.batch, self.kv_heads, self.capacity, self.head_dim]  # (B, kv, capacity, hd)
                self._bind_all(io, full, full, 0, 0)
                self._bound = (io, None)
            return
        past = [self.batch, self.kv_heads, self.length, self.head_dim]  # (B, kv, past, hd)
        present = [self.batch, self.kv_heads, total, self.head_dim]  # (B, kv, past + S, hd)
        self._bind_all(io, past, present, self.cur, 1 - self.cur)

    def bind_row(self, io, row: int, count: int = 1) -> None:
        """Shared mode: bind rows row .. row+count-1 of every buffer as a batch of `count`, (count, kv, capacity,
        hd) — consecutive rows of a (B, kv, capacity, hd) buffer are contiguous — to run them alone (a "seqlens"
        batch is prefilled row by row; continuous batching decodes the rows in use, a prefix of the cache)."""
        assert self.shared and 0 <= row and row + count <= self.batch
        if self._bound != (io, row, count):
            part = [count, self.kv_heads, self.capacity, self.head_dim]
            self._bind_all(io, part, part, 0, 0, offset=row * self.kv_heads * self.capacity * self.head_dim)
            self._bound = (io, row, count)

    def _bind_all(self, io, past: list[int], present: list[int], src: int, dst: int, offset: int = 0) -> None:
        off = offset * self.dtype.itemsize
        for pin, pout, pair in zip(self.past_names, self.present_names, self.bufs):
            io.bind_input(pin, self.device, self.device_id, self.dtype, past, pair[src].ptr + off)
            io.bind_output(pout, self.device, self.device_id, self.dtype, present, pair[dst].ptr + off)

    def advance(self, new_tokens: int, row: int | None = None, count: int = 1) -> None:
        """After a step over every row (or over rows row .. row+count-1): present becomes the next past (ping-pong:
        the other buffer of each pair)."""
        if row is None:
            self.lengths += new_tokens
        else:
            self.lengths[row:row + count] += new_tokens
        if not self.shared:
            self.cur = 1 - self.cur

    def host_layer(self, i: int, which: int = 0) -> np.ndarray:
        """Layer i's cached keys (which=0) or values (1) as (B, kv, T, hd), CPU only (tests, debugging)."""
        buf = self.bufs[2 * i + which][self.cur]
        assert buf.host is not None, "host_layer reads CPU buffers only"
        B, kv, T, hd = self.batch, self.kv_heads, self.length, self.head_dim
        if self.shared:  # (B, kv, capacity, hd): the first T positions of each row
            return buf.host.reshape(B, kv, self.capacity, hd)[:, :, :T]
        return buf.host[:B * kv * T * hd].reshape(B, kv, T, hd)
