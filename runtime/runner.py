"""Generation over an export folder: IO-bound steps, chunked prefill, greedy and sampled decoding, stop tokens and
strings, left-padded batches, streaming. Sampling and padding reuse the reference's code (`qwen2_ref.generate`),
so the runner and the reference draw the same tokens from the same logits."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from qwen2_ref.errors import Qwen2Error
from qwen2_ref.generate import SamplingParams, TextStream, left_pad, next_token

from .folder import ExportFolder, open_export, require_tokenizer
from .kv import KVCache
from .session import Session, SessionSettings, build_session, check_graph

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
KEEP = "logits_to_keep"
GQA = "com.microsoft::GroupQueryAttention"
VERIFY_ROWS = 64  # the widest one-sequence step whose logits buffer is kept (a verify step: the draft + 1)


@dataclass(frozen=True)
class GenerationConfig(SamplingParams):
    """The reference's SamplingParams plus what a serving runner needs."""
    repetition_penalty: float = 1.0  # 1: off; CTRL / Hugging Face rule on every token already in the sequence
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


@dataclass
class Stats:
    prompt_tokens: int = 0  # per sequence, padded length
    batch: int = 1
    prefill_s: float = 0.0  # prompt in, first token's logits out
    new_tokens: int = 0  # per sequence, steps run
    decode_s: float = 0.0  # after the first token
    finish: list[str] = field(default_factory=list)  # per sequence: stop | length | context
    verify_steps: int = 0  # speculative decoding: forward steps after the first token,
    drafted: int = 0  # tokens proposed,
    accepted: int = 0  # and kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return (self.new_tokens - 1) / self.verify_steps if self.verify_steps else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens * self.batch / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) * self.batch / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0


def _layer_key(name: str) -> tuple[int, int]:
    m = re.search(r"\.(\d+)\.(key|value)$", name)
    return (int(m.group(1)), m.group(2) == "value") if m else (1 << 30, 0)


def gqa_in_every_layer(folder: ExportFolder, layers: int) -> bool:
    """Whether each of the graph's `layers` attentions is GroupQueryAttention, which takes past and returns
    present itself and so can share one buffer for both (kv.py). Read from the export report's op histogram (the
    saved graph's nodes): no graph or weights to load, and `import onnx` alone costs a second. One attention per
    layer, so as many GQA nodes as layers leaves none for Concat or Dual Chunk Attention. No report: False, the
    ping-pong cache, which is right for every graph."""
    return folder.report.get("ops", {}).get(GQA, 0) == layers


class Runner:
    def __init__(self, model: str | Path | ExportFolder, settings: SessionSettings | None = None,
                 kv_share: bool = True, greedy_on_device: bool | None = None):
        """`kv_share=False` keeps the ping-pong KV cache even where the graph could share one buffer (a "seqlens"
        export shares it whatever this says). `greedy_on_device`: greedy decode steps take the arg-max where the
        logits are (DeviceArgmax), so only token ids reach the host; None: when the session runs on a GPU."""
        self.folder = model if isinstance(model, ExportFolder) else open_export(model)
        self.settings = settings or SessionSettings()
        self.session: Session = build_session(self.folder.onnx_path, self.settings)
        sess = self.sess = self.session.sess
        check_graph(sess, self.folder.path)
        ins = {i.name: i for i in sess.get_inputs()}
        self.past_names = sorted((n for n in ins if n.startswith("past_key_values.")), key=_layer_key)
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        missing = set(self.present_names) - {o.name for o in sess.get_outputs()}
        if missing:
            raise Qwen2Error(f"{self.folder.path}: graph has no outputs {sorted(missing)[:2]}... for its past inputs")
        first = ins[self.past_names[0]]
        self.kv_dtype = ORT_TYPES[first.type]
        _, self.kv_heads, _, self.head_dim = first.shape
        # "seqlens" attention (export/plan.py): each row's keys from position 0 and its length from its mask row;
        # a batch is prefilled row by row into its rows of the shared cache, then decoded together
        self.per_row = self.folder.report.get("plan", {}).get("attention") == "seqlens"
        self.shared_kv = (kv_share or self.per_row) and gqa_in_every_layer(self.folder, len(self.past_names) // 2)
        if self.per_row and not self.shared_kv:
            raise Qwen2Error(f"{self.folder.path}: a seqlens-attention export needs GroupQueryAttention in every "
                             "layer (its export report says otherwise): re-export it")
        self.vocab = self.folder.config.vocab_size
        overridable = {i.name for i in sess.get_overridable_initializers()}
        self.keep_last = KEEP in ins or KEEP in overridable  # graph can compute the last position's logits only
        if self.keep_last:
            import onnxruntime as ort

            self._keep_one = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
        self.device = self.session.device
        self.greedy_on_device = self.device != "cpu" if greedy_on_device is None else greedy_on_device
        self._argmax: DeviceArgmax | None = None
        self.cache: KVCache | None = None
        self._logits: dict[tuple[int, int], tuple[object, np.ndarray | None]] = {}
        self._wide: np.ndarray | None = None  # the CPU verify steps' logits (kept from the widest yet)
        self._io = sess.io_binding()
        self.stats = Stats()
        self.speculator = None  # speculative.PromptLookup or DraftModel: generate() speculates (a batch of one)
        self._keeps: dict[int, object] = {}

    # ---- one forward step ------------------------------------------------------------------------------------------
    def _logits_out(self, batch: int, rows: int):
        """A logits OrtValue (B, rows, V): one per batch size for the one-row shapes (decode reuses its buffer
        throughout); on the CPU, views of one kept buffer for a sequence's multi-row (verify) steps; a fresh one
        otherwise (so that prompts of every length do not each keep a buffer)."""
        key = (batch, rows)
        if key in self._logits:
            return self._logits[key]
        import onnxruntime as ort

        if self.device == "cpu" and batch == 1 and 1 < rows <= VERIFY_ROWS:
            # speculative verify steps, every width a view of one buffer (the widest yet): a fresh 10 MB buffer
            # per step costs its page faults, ~4 ms at 17 rows
            if self._wide is None or self._wide.size < rows * self.vocab:
                self._logits = {k: v for k, v in self._logits.items() if not (k[0] == 1 and k[1] > 1)}
                self._wide = np.zeros(rows * self.vocab, dtype=np.float32)
            a = self._wide[:rows * self.vocab].reshape(1, rows, self.vocab)
            out = self._logits[key] = (ort.OrtValue.ortvalue_from_numpy(a), a)
            return out
        if self.device == "cpu":
            a = np.zeros((batch, rows, self.vocab), dtype=np.float32)
            out = (ort.OrtValue.ortvalue_from_numpy(a), a)
        else:
            out = (ort.OrtValue.ortvalue_from_shape_and_type([batch, rows, self.vocab], np.float32, self.device,
                                                             self.settings.device_id), None)
        if rows == 1 or (batch == 1 and rows <= 16):  # decode; speculative verify steps
            self._logits[key] = out
        return out

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, row: int | None = None,
             fetch: bool = True, keep: int = 1):
        """Run (B, S) new tokens against the cache; returns the last position's logits (B, V) on the host (with
        `keep` > 1 the last `keep` positions', (B, keep, V)), or with `fetch=False` the logits OrtValue (B, rows, V)
        where the session left it. `mask` covers past + new tokens:
        (B, past + S) for a left-padded batch, each row's own length for a "seqlens" export. `row`: the batch is
        the cache's rows row .. row+B-1 alone (a batch of one into its row of the shared cache, or the first B rows
        of a larger one)."""
        B, S = ids.shape
        cache = self.cache
        assert cache is not None and (row is not None or self.per_row or mask.shape == (B, cache.length + S))
        io = self._io  # never cleared: each step rebinds what changed, the shared cache stays bound (kv.py)
        feeds = [np.ascontiguousarray(a, dtype=np.int64) for a in (ids, mask, pos)]  # kept alive through run
        for name, a in zip(("input_ids", "attention_mask", "position_ids"), feeds):
            io.bind_cpu_input(name, a)
        if self.keep_last:  # an overridable initializer: bind_cpu_input rejects those, an OrtValue binds
            io.bind_ortvalue_input(KEEP, self._keep_one if keep == 1 else self._keep(keep))  # kept alive: cached
        rows = keep if self.keep_last else S
        ov, host = self._logits_out(B, rows)
        io.bind_ortvalue_output("logits", ov)
        if row is None:
            cache.bind(io, S)
        else:
            cache.bind_row(io, row, B)
        self.sess.run_with_iobinding(io)
        cache.advance(S, row, B)
        if not fetch:
            return ov
        if host is None:  # CUDA: the cache stays on the device; only the (B, rows, V) logits cross
            host = ov.numpy()
        return host[:, -1] if keep == 1 else host[:, -keep:]

    def _keep(self, k: int):
        """The `logits_to_keep` value k as an OrtValue, one per k for the runner's life: the binding holds only a
        pointer to its memory, which must outlive the run."""
        if k not in self._keeps:
            import onnxruntime as ort

            self._keeps[k] = ort.OrtValue.ortvalue_from_numpy(np.array(k, dtype=np.int64))
        return self._keeps[k]

    def _ensure_cache(self, batch: int, tokens: int) -> KVCache:
        if self.cache is None or not self.cache.fits(batch, tokens):
            self.cache = None  # free the old buffers first
            self.cache = KVCache(self.past_names, self.present_names, batch, self.kv_heads, self.head_dim, tokens,
                                 self.kv_dtype, self.device, self.settings.device_id, self.shared_kv)
        self.cache.reset()
        return self.cache

    def prefill(self, ids: np.ndarray, mask: np.ndarray, chunk: int = 0) -> np.ndarray:
        """Prompt (B, T) with its mask, `chunk` tokens per step (0: all at once); last position's logits (B, V).
        A "seqlens" export's batch: each row's real tokens alone, into its row of the cache."""
        if self.per_row and ids.shape[0] > 1:
            return np.stack([self._prefill_row(r, ids[r, mask[r] == 1], chunk) for r in range(ids.shape[0])])
        T = ids.shape[1]
        pos = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)  # left padding: real tokens count from 0
        step = chunk if chunk > 0 else T
        for s in range(0, T, step):
            e = min(T, s + step)
            logits = self.step(ids[:, s:e], mask[:, :e], pos[:, s:e])
        return logits

    def _prefill_row(self, row: int, ids: np.ndarray, chunk: int) -> np.ndarray:
        T = len(ids)
        step = chunk if chunk > 0 else T
        for s in range(0, T, step):
            e = min(T, s + step)
            logits = self.step(ids[None, s:e], np.ones((1, e), dtype=np.int64), np.arange(s, e)[None], row=row)
        return logits[0].copy()  # a view of the (1, 1, V) buffer the next row's steps write

    # ---- generation --------------------------------------------------------------------------------------------------
    def check_prompt(self, n_tokens: int) -> None:
        ctx = self.folder.context
        if n_tokens > ctx:
            raise Qwen2Error(f"the prompt has {n_tokens} tokens but the export's context is {ctx}: shorten the prompt "
                             "or re-export with a larger --max-context")

    def default_config(self, **kw) -> GenerationConfig:
        """A config that stops on the export's end-of-sequence tokens unless `stop_token_ids` is given."""
        kw.setdefault("stop_token_ids", self.folder.eos_token_ids)
        return GenerationConfig(**kw)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, prefill_chunk: int | None = None,
                 stop_check=None) -> Iterator[list[int | None]]:
        """Yield, per step, one new token per prompt (None once that prompt has stopped) — the reference's
        contract (`qwen2_ref.generate.generate`). `stop_check(row, token) -> bool` ends a row early (stop strings)."""
        chunk = self.settings.prefill_chunk if prefill_chunk is None else prefill_chunk
        ctx = self.folder.context
        self.check_prompt(max((len(p) for p in prompts), default=0))
        if self.speculator is not None:
            if len(prompts) != 1:
                raise Qwen2Error("speculative decoding (--lookup, --draft) runs one prompt at a time")
            from .speculative import speculative_generate

            yield from speculative_generate(self, prompts[0], params, self.speculator, chunk, stop_check)
            return
        ids_t, mask_t = left_pad(prompts, self.folder.pad_token_id)
        ids, mask = ids_t.numpy(), mask_t.numpy()
        B, T = ids.shape
        steps = min(params.max_new_tokens, ctx - T + 1)  # the last token needs no forward step
        self.stats = st = Stats(prompt_tokens=T, batch=B, finish=["length"] * B)
        if steps <= 0:
            if params.max_new_tokens > 0:
                st.finish = ["context"] * B
            return
        self._ensure_cache(B, T + steps - 1)
        # the whole generation's mask, allocated once: the prompt's, then one column per decode step (views feed the
        # steps; a batch of one needs no copy). Positions go on from each row's real token count. A "seqlens"
        # batch's rows start at position 0: row r's mask is its length's ones, right-padded to the longest.
        pos = mask.sum(-1, keepdims=True)  # (B, 1)
        if self.per_row and B > 1:
            full_mask = (np.arange(T + steps)[None, :] <= pos).astype(np.int64)  # a column more each step
        else:
            full_mask = np.ones((B, T + steps - 1), dtype=np.int64)
            full_mask[:, :T] = mask
        penalty = getattr(params, "repetition_penalty", 1.0)
        seen = None
        if penalty != 1.0:
            seen = torch.zeros(B, self.vocab, dtype=torch.bool)
            seen.scatter_(1, ids_t, mask_t.bool())  # prompt tokens, padding excluded
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stops = torch.tensor(list(params.stop_token_ids), dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        on_device = self.greedy_on_device and params.greedy and seen is None
        t0 = time.perf_counter()
        logits = self.prefill(ids, mask, chunk)
        t1 = time.perf_counter()
        st.prefill_s = t1 - t0
        for i in range(steps):
            if isinstance(logits, np.ndarray) and params.greedy and seen is None:
                # numpy's arg-max (first maximum, as torch's): torch's costs ~0.4 ms a step beside ONNX Runtime's
                # spinning workers, over 1% of a 0.5B int4 decode step
                tok = torch.from_numpy(logits.argmax(-1))
            elif isinstance(logits, np.ndarray):
                scores = torch.from_numpy(logits)
                if seen is not None:
                    scores = apply_repetition_penalty(scores, seen, penalty)
                tok = next_token(scores, params, gen)
            else:  # the logits OrtValue, where the session left it: only the token ids come back
                tok = torch.from_numpy(self._device_argmax()(logits))
            if seen is not None:
                seen[torch.arange(B), tok] = True
            if i == 0:
                t1 = time.perf_counter()
                st.prefill_s = t1 - t0  # time to first token
            st.new_tokens = i + 1
            out = [None if d else int(t) for t, d in zip(tok.tolist(), done.tolist())]
            ended = torch.isin(tok, stops)
            if stop_check is not None:
                ended |= torch.tensor([t is not None and stop_check(r, t) for r, t in enumerate(out)])
            for r in range(B):
                if out[r] is not None and bool(ended[r]):
                    st.finish[r] = "stop"
            yield out
            done |= ended
            last = i == steps - 1
            if bool(done.all()) or last:
                if last and steps < params.max_new_tokens:
                    st.finish = [f if f == "stop" else "context" for f in st.finish]
                break
            m = full_mask[:, :int(pos.max()) + 1] if self.per_row and B > 1 else full_mask[:, :T + i + 1]
            logits = self.step(tok.numpy()[:, None], m, pos, fetch=not on_device)
            pos += 1
            if self.per_row and B > 1:
                full_mask[np.arange(B), pos[:, 0]] = 1  # each row's mask one longer for the next step
        st.decode_s = time.perf_counter() - t1

    # ---- text -----------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        tok = require_tokenizer(self.folder)
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            prompt = tok.apply_chat_template(msgs)
        return tok.encode(prompt)

    def stream(self, prompt: str | Sequence[int], params: GenerationConfig, chat: bool = False,
               system: str | None = None, prefill_chunk: int | None = None) -> Iterator[str]:
        """Generated text piece by piece, UTF-8 safe; text that might begin a stop string is held back until it
        is known not to, and the output ends before the stop string."""
        ids = self.encode_prompt(prompt, chat, system) if isinstance(prompt, str) else list(prompt)
        texts = [_StopText(require_tokenizer(self.folder), params.stop_strings)]
        for step in self.generate([ids], params, prefill_chunk, stop_check=lambda r, t: texts[r].push(t)):
            if step[0] is None:
                break
            piece = texts[0].take()
            if piece:
                yield piece
        rest = texts[0].take(final=True)
        if rest:
            yield rest

    def complete(self, prompts: Sequence[str | Sequence[int]], params: GenerationConfig, chat: bool = False,
                 prefill_chunk: int | None = None) -> list["Completion"]:
        """A batch of prompts (left-padded into one run); text, tokens and finish reason per prompt."""
        ids = [self.encode_prompt(p, chat) if isinstance(p, str) else list(p) for p in prompts]
        tok = self.folder.tokenizer
        texts = [_StopText(tok, params.stop_strings) for _ in ids] if tok is not None else None
        check = (lambda r, t: texts[r].push(t)) if texts is not None else None
        out: list[list[int]] = [[] for _ in ids]
        for step in self.generate(ids, params, prefill_chunk, stop_check=check):
            for r, t in enumerate(step):
                if t is not None:
                    out[r].append(t)
        return [Completion(texts[r].take(final=True) if texts else "", out[r], self.stats.finish[r])
                for r in range(len(ids))]

    def _device_argmax(self) -> "DeviceArgmax":
        if self._argmax is None:
            self._argmax = DeviceArgmax(self.session.active, self.device, self.settings.device_id)
        return self._argmax

    def end_profiling(self) -> str | None:
        return self.sess.end_profiling() if self.settings.profile_prefix else None


class DeviceArgmax:
    """Greedy decoding without the logits leaving the device: a one-node ONNX Runtime session (ArgMax over the
    vocabulary) on the runner's providers, fed the step's logits OrtValue by IO binding; only the (B,) token ids
    are copied to the host (on CUDA: 8·B bytes a step instead of 4·B·vocab)."""

    def __init__(self, providers: Sequence[str], device: str, device_id: int = 0):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("ArgMax", ["logits"], ["ids"], axis=-1, keepdims=0)], "greedy",
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "rows", "vocab"])],
            [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "rows"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
        self.io = self.sess.io_binding()

    def __call__(self, logits) -> np.ndarray:
        """(B, rows, V) logits OrtValue -> the last row's arg-max (B,) int64 on the host."""
        self.io.bind_ortvalue_input("logits", logits)
        self.io.bind_output("ids", "cpu")
        self.sess.run_with_iobinding(self.io)
        return self.io.copy_outputs_to_cpu()[0][:, -1]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length | context


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019) as Hugging Face applies it: a seen token's positive logit is divided by the
    penalty, a negative one multiplied."""
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pen, logits)


class _StopText:
    """Incremental text of one sequence with stop strings: `push` a token (True once a stop string appears),
    `take` the text that is safe to show."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.stream = TextStream(tokenizer) if tokenizer is not None else None
        self.stops = [s for s in stop_strings if s]
        self.text, self.shown, self.stopped = "", 0, False

    def push(self, token: int) -> bool:
        if self.stopped or self.stream is None:
            return self.stopped
        self.text += self.stream.push(token)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        return self.stopped

    def take(self, final: bool = False) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            end -= max((k for s in self.stops for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])),
                       default=0)
        end = max(end, self.shown)
        piece, self.shown = self.text[self.shown:end], end
        return piece
