"""The KV cache: device buffers allocated once, bound to the graph's past inputs and present outputs by pointer.

The exported graph concatenates past and new keys (`present = Concat(past, new)`), so past and present cannot be
one buffer. Each layer's key and value get two flat buffers instead (ping-pong): a step binds past to one and
present to the other, ONNX Runtime writes `past + new` straight into it, and the next step swaps the two. Flat,
because the first B·kv·T·hd elements of a flat buffer are a contiguous (B, kv, T, hd) tensor for every T, so no
step allocates, reshapes or copies on the host. On CUDA the buffers live on the GPU and never visit the host.
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
                 capacity: int, dtype: np.dtype, device: str, device_id: int = 0):
        self.past_names, self.present_names = past_names, present_names
        self.batch, self.kv_heads, self.head_dim, self.capacity = batch, kv_heads, head_dim, capacity
        self.dtype, self.device, self.device_id = np.dtype(dtype), device, device_id
        n = batch * kv_heads * capacity * head_dim
        self.bufs = [(alloc(n, dtype, device, device_id), alloc(n, dtype, device, device_id)) for _ in past_names]
        self.length = 0  # tokens cached (including left padding)
        self.cur = 0  # which buffer of each pair holds the cache

    @property
    def nbytes(self) -> int:
        return 2 * len(self.bufs) * self.bufs[0][0].n * self.dtype.itemsize

    def fits(self, batch: int, tokens: int) -> bool:
        return batch == self.batch and tokens <= self.capacity

    def reset(self) -> None:
        self.length, self.cur = 0, 0

    def bind(self, io, new_tokens: int) -> None:
        """Bind past (the cached tokens) and present (past + `new_tokens`) for the next step."""
        total = self.length + new_tokens
        assert total <= self.capacity, (total, self.capacity)
        past = [self.batch, self.kv_heads, self.length, self.head_dim]  # (B, kv, past, hd)
        present = [self.batch, self.kv_heads, total, self.head_dim]  # (B, kv, past + S, hd)
        for (pin, pout), pair in zip(zip(self.past_names, self.present_names), self.bufs):
            src, dst = pair[self.cur], pair[1 - self.cur]
            io.bind_input(pin, self.device, self.device_id, self.dtype, past, src.ptr)
            io.bind_output(pout, self.device, self.device_id, self.dtype, present, dst.ptr)

    def advance(self, new_tokens: int) -> None:
        """After a step: present becomes the next past."""
        self.length += new_tokens
        self.cur = 1 - self.cur

    def host_layer(self, i: int, which: int = 0) -> np.ndarray:
        """Layer i's cached keys (which=0) or values (1) as (B, kv, T, hd), CPU only (tests, debugging)."""
        buf = self.bufs[2 * i + which][self.cur]
        n = self.batch * self.kv_heads * self.length * self.head_dim
        assert buf.host is not None, "host_layer reads CPU buffers only"
        return buf.host[:n].reshape(self.batch, self.kv_heads, self.length, self.head_dim)
