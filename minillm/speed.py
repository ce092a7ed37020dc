"""The speed layer: faster ways to compute exactly what model.py computes, opted into by the caller.

model.py is the reference a reader learns from and never mentions this file. A command line (or a
user) calls `speed_layer(model)` after loading (`speed_up` and the one-call decode step, below), or the
parts alone, and optionally `prepack(model)`; they change the model in place by giving it and some of its
modules a subclass whose
overridden methods take a faster route to the same numbers (tests/test_speed.py holds each against
the reference; the int4 kernel, which rounds x differently, tests/test_int4_kernel.py):

* FewRowLinear: a float32 or bf16 x @ Wᵀ of 1..16 rows (one-token decoding; speculative verification
  of up to 15 drafts) through our kernel (kernels/rows.cpp, CPUs with AVX-512 VNNI), which reads W
  once for all the rows: on an AVX-512 Xeon 9 fp32 rows cost it ~1.2 one-row times where PyTorch's
  CPU GEMM (MKL) takes 3.2, and one bf16 row half of PyTorch's time (`python -m bench.step_cost
  few-rows` prints each way per M). Each row's numbers do not depend on the other rows of the call.
  Elsewhere, 4..16 fp32 rows through oneDNN's matmul (torch.ops.mkldnn._linear_pointwise) where a
  probe finds it faster than MKL on this CPU, for matrices of 2M weights or more (on W as it is
  oneDNN pays a per-call cost, by the look of it reordering W, that smaller ones do not repay);
  `prepack(model)` keeps W reordered for it once, at the price of a second copy. few_row_route
  decides once per process; MINILLM_FEW_ROWS=own|onednn|linear overrides it. CPU, no grad only.
  A layer's float q, k, v and its gate, up run as one matrix each (StackedLinear, the layers' weights
  views of it): one call instead of three or two, the few-row kernel's numbers bit for bit.
* GQADecodeAttention: attention through our kernels (kernels/attention.cpp) where they run. A prompt's
  (more than 16 queries, fp32) visits only the keys each block of queries sees: PyTorch's CPU kernel
  computes every score of a 512-token prompt and masks half (~0.55x its time). 1..16 queries (a
  decode step, a verification; fp32 or bf16) go to the few-query kernel, one query row at a time:
  ~10 us a SmolLM2 layer where PyTorch's SDPA call took ~30 in a compiled step, and a row's numbers
  do not depend on the others in its call. Elsewhere (no kernel, grad) at decode with grouped-query
  attention the n_head/n_kv_head query heads that share a K/V head become that many query rows of
  one SDPA call, so the cached K/V are read once instead of being expanded per query head.
* FusedRMSNorm, GQADecodeAttention.project, SwiGLUMLP: RMSNorm, RoPE and silu(gate) * up in float32
  through our one-pass kernels (kernels/pointwise.cpp; RoPE the reference's numbers bit for bit).
* VNNIInt4Linear, VNNIInt8Linear (kernels/): int4 and int8 layers on CPUs with AVX-512 VNNI run our
  kernel, which rounds x to int8 per 32 inputs as llama.cpp does (not the same numbers as
  quantized.py's bf16 route: within about 1% of the largest output; tests/test_int4_kernel.py) and
  serves up to 16 rows per pass over the weights, where PyTorch's int4 kernel takes 4. The int4 q, k,
  v of a layer and its gate, up run as one matrix each (StackedInt4, GQADecodeAttention.qkv and
  SwiGLUMLP): two calls instead of five, the same numbers.
* batch_invariant (an exact mode, not a faster one): every float matmul of a call without grad runs
  in blocks of exactly `rows` rows (BlockedLinear; the last block padded with zeros) and attention
  computes each query alone (OneQueryAttention), so a token's numbers do not depend on how many
  tokens share the call. A (k+1)-row speculative verification then gives each position the logits
  a one-row step gives it, bit for bit, and greedy speculative output is the target's own greedy
  output in bf16 and int4 as in fp32. Why blocks: a GEMM's reduction order depends on its shape
  (M = 1 and M = 5 round differently, measured); within one shape a row's place in the block
  mostly changes nothing, and where it does (bf16 at 5 rows here) a probe at setup picks the next
  block size that is place-invariant (steady_block). Our kernels (int4, int8, float rows.cpp, the
  few-query attention) already give each row the same numbers whatever the row count
  (tests/test_speed.py holds them): where FewRowLinear takes ours, blocks are of up to 16 rows,
  unpadded, and all of a call's queries go to the few-query kernel at once. Its cost: elsewhere
  attention one query at a time, and, off our float kernel, a one-token step pays for a `rows`-row
  call (`python -m bench.speculative speed --batch-invariant ROWS` measures it). Call prepack, if at
  all, before it: the probe tries the route the matmuls will take.
* reuse_freed_memory (host_memory.py), for the whole process: glibc's malloc keeps freed blocks under
  32 MB for reuse instead of mapping each big activation afresh from the OS (page faults on first
  touch at every use): a 512-token SmolLM2 prefill went from ~50,000 page faults to almost none.
* compile_decode: one-token cached calls without grad run through torch.compile (the many small ops
  between the matmuls fused); every other call stays eager. The first such call compiles (needs a
  C++ compiler; minutes for a 135M model on two CPU cores). Dynamo's thousands of checks on the
  modules before each call are replaced by a check of our own of what can change (CompiledStep).
  A LLaMA-family model on our kernels in int4, bf16 or float32 (what speed_up makes of SmolLM2's and
  Qwen's checkpoints on a CPU with AVX-512 VNNI) needs no graph: OneCallStep runs all its blocks for
  one token in one C++ call (kernels/step.cpp), the eager step's operations and roundings (in float32
  its numbers bit for bit): on SmolLM2 1.3-1.5x the graph's speed, 1.6-3.6x the eager step's
  (bench/README.md, "Every block in one call", "One call for float models too"); a verification of up to
  16 tokens too, each token's numbers those of its one-token step (greedy speculative output = plain
  greedy output). Others (GPT-2, int8 or float16 layers, head_dim not a multiple of 16) compile a graph.
* speed_layer, what the commands run: speed_up, then, for a model OneCallStep takes, compile_decode
  without the graph: its call where it takes the call, eager where not (a hook, the exact mode, batch 2);
  nothing compiles. A model it does not take (GPT-2, CUDA) stays speed_up's. sample.py's --compile adds
  the graph for the one-token steps it does not take.
"""

from __future__ import annotations

import copy
import functools
import itertools
import operator
import os
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import (ATTENTION_GROUP, ROWS_MAX, StackedInt4, VNNIInt4Linear, causal_attention, few_query_attention,
                      forget_torch_layouts, rms_norm, rope, rows_mm, swiglu, use_kernel, vnni)
from .kv_cache import KVCache
from .model import MLP, Attention, Block, RMSNorm, Transformer
from .host_memory import drop_file_pages, release_freed_memory, reuse_freed_memory
from .quantized import Int4Linear, Int8Linear, QuantEmbedding


class FewRowLinear(nn.Linear):
    ROWS = range(4, 17)  # oneDNN's: 2-3 rows cost MKL (nn.Linear) about one row's time already
    MIN_WEIGHTS = 1 << 21  # unpacked, below ~2M weights (SmolLM2's 1536 x 576) oneDNN's per-call cost outweighs its gain
    packed: tuple[torch.Tensor, int | None] | None = None  # prepack(): (W reordered for oneDNN, version(W) then)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if 1 <= rows <= ROWS_MAX and self.takes_our_kernel(x):
            y = rows_mm(x.reshape(rows, self.in_features), self.weight).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if rows in self.ROWS and x.device.type == "cpu" and x.dtype == self.weight.dtype \
                and not torch.is_grad_enabled():
            w = self.onednn_weight()
            if w is not None:
                return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        return super().forward(x)

    def takes_our_kernel(self, x: torch.Tensor) -> bool:
        """Whether rows of x, up to 16 a call, go to our kernel (kernels/rows.cpp) here: CPU, float32 or
        bf16 as W (contiguous), no grad, and the route few_row_route names is ours."""
        return x.device.type == "cpu" and x.dtype == self.weight.dtype and x.dtype in (
            torch.float32, torch.bfloat16) and not torch.is_grad_enabled() and self.weight.is_contiguous() \
            and ours_for(x.dtype)

    def onednn_weight(self) -> torch.Tensor | None:
        """What oneDNN multiplies: the prepacked weight while W is unchanged since (its _version), else W
        itself where it is large enough and the probe found oneDNN faster here; None: nn.Linear's way."""
        if self.packed is not None and self.packed[1] == version(self.weight):
            return self.packed[0]
        if self.weight.numel() >= self.MIN_WEIGHTS and few_row_route(self.weight.dtype) == "onednn":
            return self.weight
        return None

    @classmethod
    def wrap(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> FewRowLinear:
        """A FewRowLinear holding `weight` (out, in) itself, not a copy (for benchmarks and tests)."""
        lin = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight, requires_grad=False)
        lin.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return lin


class StackedLinear:
    """Float FewRowLinear layers that read the same x (q, k, v; gate, up) multiplied as one matrix: their
    weights (and biases) stacked once, each layer's own now a view of the stack (no memory added). One
    call instead of three or two: for a prompt PyTorch's GEMM runs wider matrices faster (SmolLM2's q|k|v
    ~9% and gate|up ~4% in bench/README.md), for a few rows our kernel pays its per-call costs once and
    sums each output exactly as the separate layer's call does. Eager calls without grad only (a compiled
    step, training and the exact mode multiply the layers one by one); stale for good once a layer holds
    other numbers than its view (.to(), a new Parameter) or the module holds another layer (LoRA, a
    swap), and the layers are then multiplied one by one (the stack's copy let go)."""

    def __init__(self, parts: list[FewRowLinear]):
        self.parts, self.sizes = parts, [p.out_features for p in parts]
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        self.linear = FewRowLinear.wrap(weight, bias)
        for i, p in enumerate(parts):
            drop_file_pages(p.weight)  # read from a mapped checkpoint: its pages no longer count as resident
            p.weight.data = weight.split(self.sizes)[i]
            if bias is not None:
                p.bias.data = bias.split(self.sizes)[i]
        self.views = self.pointers()

    @classmethod
    def of(cls, parts: list[nn.Module]) -> StackedLinear | None:
        """The stack of `parts`, or None where they cannot share a call (not all plain float FewRowLinear
        layers on the CPU, different input widths or dtypes, bias on some only, oneDNN-prepacked)."""
        if not all(cls.plain(p) and p.weight.device.type == "cpu" and p.weight.is_contiguous() for p in parts) or len(
                {(p.in_features, p.weight.dtype, p.bias is None) for p in parts}) != 1 \
                or parts[0].weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        return cls(parts)

    @staticmethod
    def plain(layer: nn.Module) -> bool:
        """A FewRowLinear of the default route: not the exact mode's BlockedLinear, not oneDNN-prepacked."""
        return type(layer) is FewRowLinear and layer.packed is None

    def pointers(self) -> list[int]:
        return [t.data_ptr() for t in self.tensors()]

    def takes(self, x: torch.Tensor, layers: list[nn.Module]) -> bool:
        """Whether this call goes through the stack: eager (not being compiled), no grad, x as the weights'
        dtype, and the stack holds `layers`."""
        if torch.compiler.is_compiling():
            return False
        return not torch.is_grad_enabled() and self.holds(layers) and x.dtype == self.linear.weight.dtype

    def holds(self, layers: list[nn.Module]) -> bool:
        """Whether the stack multiplies `layers` (the module's now) as they are: the stacked ones, plain
        FewRowLinear (not the exact mode's, not prepacked: their own copies for oneDNN serve few rows
        better than the stack's W as it is), still holding their views (else stale for good)."""
        if self.linear is None:
            return False
        if not all(a is b for a, b in zip(self.parts, layers)) or self.pointers() != self.views:
            self.linear = None  # stale: the layers run one by one from now on
            return False
        return all(map(self.plain, self.parts))

    def tensors(self) -> list[torch.Tensor]:
        """The layers' weights and biases, whose addresses (pointers) say whether each still holds its view."""
        return [t for p in self.parts for t in (p.weight, p.bias) if t is not None]

    def __deepcopy__(self, memo) -> StackedLinear:
        """A deep copy of the model stacks its copies of the layers afresh: deepcopy clones each Parameter, so
        they would hold copies of their own, off the copied stack (stale from the start, and twice the memory)."""
        parts = copy.deepcopy(self.parts, memo)
        if self.linear is not None:
            return StackedLinear(parts)
        stale = object.__new__(StackedLinear)
        stale.parts, stale.sizes, stale.linear, stale.views = parts, self.sizes, None, []
        return stale

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (..., K) -> each layer's output (..., its out_features), views of one product."""
        return self.linear(x).split(self.sizes, dim=-1)


ROUTES = ("own", "onednn", "linear")


@functools.cache
def few_row_route(dtype: torch.dtype) -> str:
    """How FewRowLinear multiplies 1..16 rows of float32 or bf16 here, decided once per process and dtype:
    "own" (our kernel, kernels/rows.cpp) where it is built (AVX-512 VNNI CPUs); else "onednn" where
    oneDNN's matmul of 4..16 rows beats nn.Linear's on this CPU, else "linear". The oneDNN probe
    (under a second, most of it making the matrix): 5 and 9 rows (verifying 4 and 8 drafts) times an
    8960 x 1536 matrix (Qwen2.5-1.5B's MLP; beyond the private caches, as real weights are: a matrix
    that stays in cache hides the difference), both ways alternated, best of 5 each. oneDNN must win
    by 10% on the sum: noise on a busy machine then keeps nn.Linear. The choice differs by CPU
    (bench/README.md, machines A and D). Probed for float32 only. MINILLM_FEW_ROWS=own|onednn|linear
    overrides it for every dtype."""
    forced = os.environ.get("MINILLM_FEW_ROWS")
    if forced:
        if forced not in ROUTES:
            raise ValueError(f"MINILLM_FEW_ROWS={forced!r}: expected one of {ROUTES}")
        if forced == "own" and vnni() is None:
            raise ValueError("MINILLM_FEW_ROWS=own: our kernel is not built here (it needs a CPU with AVX-512 VNNI, "
                             "a C++ compiler and MINILLM_QUANT_KERNEL unset or own)")
        return forced
    if dtype in (torch.float32, torch.bfloat16) and vnni() is not None:
        return "own"
    if not torch.backends.mkldnn.is_available() or dtype != torch.float32:
        return "linear"  # bf16: the two ways tie (bench/README.md), so noise would pick the rounding
    w, xs = torch.randn(8960, 1536).to(dtype), [torch.randn(m, 1536).to(dtype) for m in (5, 9)]
    ways = {"linear": lambda x: F.linear(x, w),
            "onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}
    best = {(name, i): float("inf") for name in ways for i in range(len(xs))}
    with torch.inference_mode():
        for _ in range(5):
            for (name, i), t in best.items():
                t0 = time.perf_counter()
                ways[name](xs[i])
                best[name, i] = min(t, time.perf_counter() - t0)
    total = {name: sum(best[name, i] for i in range(len(xs))) for name in ways}
    return "onednn" if total["onednn"] < 0.9 * total["linear"] else "linear"


@torch.compiler.assume_constant_result  # a compiled step takes the route decided when it was traced
def ours_for(dtype: torch.dtype) -> bool:
    return few_row_route(dtype) == "own"


def takes_float32_kernels(x: torch.Tensor) -> bool:
    """Whether our float32 kernels (kernels/pointwise.cpp's RMSNorm, RoPE and SwiGLU; attention.cpp has its
    own checks, GQADecodeAttention.takes_our_kernel) take x here: CPU, float32, no grad, the kernels built
    (a compiled step calls them too, and rounds as the eager one)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and kernels_built()


@torch.compiler.assume_constant_result  # as ours_for: no graph break for the question
def kernels_built() -> bool:
    return vnni() is not None


class FusedRMSNorm(RMSNorm):
    def forward(self, x):
        if takes_float32_kernels(x) and self.weight.dtype == torch.float32:
            return rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class GQADecodeAttention(Attention):
    qkv_stack: StackedInt4 | StackedLinear | None = None  # speed_up: q, k and v as one matrix where it can

    def project(self, x, rope_tables):
        if rope_tables is None or not takes_float32_kernels(x):
            return super().project(x, rope_tables)
        q, k, v = super().project(x, None)  # not yet rotated
        return rope(q, *rope_tables), rope(k, *rope_tables), v

    def qkv(self, x):
        if self.qkv_stack is None or not self.qkv_stack.takes(x, [self.q_proj, self.k_proj, self.v_proj]):
            return super().qkv(x)
        return self.qkv_stack(x)

    def attend(self, q, k, v, mask):
        cfg = self.cfg
        B, nh, T, hd = q.shape
        if self.takes_our_kernel(q, k, v):  # mask: the causal one Transformer.forward made (None for one query)
            return causal_attention(q, k, v) if T > ROWS_MAX else few_query_attention(q, k, v)
        if cfg.attn_impl != "sdpa" or cfg.n_kv_head == nh or T != 1 or mask is not None:
            return super().attend(q, k, v, mask)
        p_drop = self.dropout if self.training else 0.0
        q = q.reshape(B, cfg.n_kv_head, nh // cfg.n_kv_head, hd)  # (B, nkv, rep, hd): rep query rows per K/V head
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop)  # (B, nkv, rep, hd)
        return y.reshape(B, nh, 1, hd)

    def takes_our_kernel(self, q, k, v) -> bool:
        """Whether this attention goes to our kernels (kernels/attention.cpp) here: CPU, no grad, no dropout,
        float32 (bf16 too for 16 queries or fewer), a head_dim multiple of 16 (at most 256), at most 96 query
        heads a K/V head, the kernels built."""
        hd, dtypes = q.shape[-1], (torch.float32, torch.bfloat16) if q.shape[2] <= ROWS_MAX else (torch.float32,)
        return q.device.type == "cpu" and q.dtype in dtypes and k.dtype == v.dtype == q.dtype and not (
            torch.is_grad_enabled() or self.training and self.dropout) and hd % 16 == 0 and hd <= 256 and \
            q.shape[1] <= ATTENTION_GROUP * k.shape[1] and kernels_built()


class SwiGLUMLP(MLP):
    """SwiGLU with gate and up as one matrix where it can (gate_up, made by speed_up: StackedInt4 where our
    int4 kernel runs them, StackedLinear for floats), and silu(gate) * up in one pass in float32
    (kernels/pointwise.cpp)."""
    gate_up: StackedInt4 | StackedLinear | None = None

    def forward(self, x):
        if self.gate_up is not None and self.gate_up.takes(x, [self.gate_proj, self.up_proj]):
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if takes_float32_kernels(gate) and gate.stride(-1) == 1 and up.stride(-1) == 1:
            return self.dropout(self.down_proj(swiglu(gate, up)))
        return self.dropout(self.down_proj(F.silu(gate) * up))


class BlockedLinear(FewRowLinear):
    rows = 8  # batch_invariant sets it per module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        flat = x.reshape(-1, self.in_features)
        n = flat.shape[0]
        if self.takes_our_kernel(x):  # a row's numbers there do not depend on its call: no padding needed
            y = torch.cat([super(BlockedLinear, self).forward(block) for block in flat.split(ROWS_MAX)])
            return y.reshape(*x.shape[:-1], self.out_features)
        flat = F.pad(flat, (0, 0, 0, -n % self.rows))  # zero rows up to a whole number of blocks
        y = torch.cat([super(BlockedLinear, self).forward(block) for block in flat.split(self.rows)])
        return y[:n].reshape(*x.shape[:-1], self.out_features)


class OneQueryAttention(GQADecodeAttention):
    def attend(self, q, k, v, mask):
        T, S = q.shape[2], k.shape[2]
        if T == 1 or torch.is_grad_enabled():
            return super().attend(q, k, v, mask)
        if self.takes_our_kernel(q[:, :, :1], k, v):  # our few-query kernel computes each query alone, for any count
            return few_query_attention(q, k, v)
        # query i sits at position S - T + i and sees keys 0..S - T + i: the call a one-token step makes there
        one = super(OneQueryAttention, self).attend
        return torch.cat([one(q[:, :, i:i + 1].contiguous(), k[:, :, :S - T + i + 1], v[:, :, :S - T + i + 1], None)
                          for i in range(T)], 2)


class CompiledDecode(Transformer):
    compiled_step: CompiledStep

    def forward(self, tokens, cache=None, start_pos=0, last_only=False):
        if cache is not None and not torch.is_grad_enabled() and tokens.shape[1] <= ROWS_MAX:
            step = self.compiled_step
            if tokens.shape[1] == 1 and step.graph:  # OneCallStep's where it takes the model, else the graph
                return step(tokens, cache, start_pos, last_only)
            logits = step.one_call_logits(tokens, cache, start_pos, last_only)  # a verification, or no graphs
            if logits is not None:
                return logits
        return super().forward(tokens, cache, start_pos, last_only)  # eager

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cpu(), ...: the tensors' dtype or device may change
        self.compiled_step.forget()
        return super()._apply(fn, recurse)


class CompiledStep:
    """compile_decode's one-token step: Transformer.forward of one model through torch.compile, with
    dynamo's guards on the model's modules left out and a check of our own in their place.

    Before each call of a compiled graph dynamo checks what it assumed of every module attribute the
    step read: 5,941 checks on SmolLM2 (each module's hooks, type and constants, each tensor's dtype and
    shape), 1.3 ms of a 7.4 ms int4 step (bench/README.md, "The compiled step's own check"). What can
    change in a loaded model between two steps is checked here instead, in ~0.1 ms a step (`state`): each
    module's type (speed_up, batch_invariant, a swapped-in layer), train/eval mode and hooks (the
    inspector's), the config's values, whether each int4 stack still holds its layers' codes and each
    float stack's layers their views of it (their tensors' addresses: a `.data =` moves one), and a
    count on each module of the parameters, buffers and modules assigned to it (PyTorch's registration
    hooks); a `.to()` of the model drops its graphs. A call whose state differs takes the graph compiled
    for that state before, if any (a hook added and removed again), else compiles again from a copy of
    forward's code of its own (dynamo still checks which code the step runs: no earlier graph, this
    model's or another model's, can be taken for it). The code is given to torch.compile as functools.partial(code, model), as
    before: bound as a method instead, the model is the frame's own `self` and the int4 step's logits
    moved off the eager step's (tests/test_speed.py, test_compiled_decode_gives_the_eager_greedy_tokens).
    Not seen: a tensor of one layer swapped in place for one of another dtype or shape
    (`layer.weight.data = ...`, `layer.half()`): call compile_decode again after such a change (OneCallStep's
    C++ call refuses to run on any tensor of its changed so)."""

    def __init__(self, model: Transformer, one_call: bool = True, graph: bool = True):
        self.model, self.step, self.seen, self.steps, self.one_call = model, None, None, [], None
        self.one_call_route = one_call  # OneCallStep for the models it takes
        self.graph = graph  # torch.compile's graph for the one-token steps OneCallStep does not take (else eager)
        self.modules = self.dicts = self.holders = self.view = self.hooked = None  # state()'s view, as last seen
        self.stacks = self.stacked = None
        _count_assignments()

    def __deepcopy__(self, memo) -> CompiledStep:
        """A deep copy of the model starts afresh: its own modules, no graph and no C++ step copied."""
        return CompiledStep(copy.deepcopy(self.model, memo), self.one_call_route, self.graph)

    def _view(self) -> tuple[list, list]:
        """Each listed module's type and assignment count: when they move, the module tree may have too."""
        return list(map(type, self.modules)), list(map(_ASSIGNED_COUNT, self.dicts))

    def state(self) -> tuple:
        # Each module's attributes are read straight from its __dict__, a C loop per attribute (map): between
        # two steps the weights' reads push these objects out of the CPU's caches, and Python loops over
        # SmolLM2's 396 modules took 0.26 ms of a 4 ms step, 0.12 now (bench/README.md, "Python around the call").
        if self.modules is None or self._view() != self.view:
            self.stacks = None
            self.modules = list(self.model.modules())
            self.dicts = [m.__dict__ for m in self.modules]
            self.holders = ([m.__dict__ for m in self.modules if isinstance(m, GQADecodeAttention)],
                            [m.__dict__ for m in self.modules if isinstance(m, SwiGLUMLP)])
            self.view = self._view()
            self.hooked = None
        hooks = torch.nn.modules.module
        stacks = [*map(_QKV_STACK, self.holders[0]), *map(_GATE_UP, self.holders[1])]
        if stacks != self.stacks:  # float stacks' layers: a `.data =` moves one off its view of the stack
            self.stacks, self.stacked = stacks, [t for s in stacks if isinstance(s, StackedLinear) for t in s.tensors()]
        return (self.view, tuple(vars(self.model.config).values()), list(map(_TRAINING, self.dicts)),
                self._hooked() or bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks),
                stacks, [getattr(s, "valid", None) for s in stacks], list(map(_DATA_PTR, self.stacked)))

    def _hooked(self) -> bool:
        """Whether any module has a forward hook or pre-hook. PyTorch's register_forward(_pre)_hook gives each
        hook a RemovableHandle, whose class numbers them all: with none numbered since the last look, which
        found none, there is none now (a hook written into a module's hook dict by hand, not through
        them, goes unseen). A look at each module's two hook dicts otherwise (0.1 ms a step while in use)."""
        handles = torch.utils.hooks.RemovableHandle.next_id
        if self.hooked is None or self.hooked[1] or self.hooked[0] != handles:
            dicts = self.dicts
            self.hooked = handles, any(map(len, map(_FORWARD_HOOKS, dicts))) or any(map(len, map(_PRE_HOOKS, dicts)))
        return self.hooked[1]

    def forget(self) -> None:
        """Drop every compiled graph (the model's tensors changed dtype or device): the next call compiles."""
        self.step, self.seen, self.steps, self.one_call = None, None, [], None

    def refresh(self) -> None:
        """Take the graph compiled for the model's state now, if any, and OneCallStep's plan for it."""
        state = self.state()
        if state != self.seen:
            self.step = next((step for seen, step in self.steps if seen == state), None)
            hooked = state[3]  # the inspector's hooks see every block run as Python
            self.one_call = OneCallStep.of(self.model) if self.one_call_route and not hooked else None
            self.seen = state

    def one_call_logits(self, tokens, cache, start_pos, last_only):
        """OneCallStep's logits for these tokens, or None where it does not take the model or the call."""
        self.refresh()
        return None if self.one_call is None else self.one_call(tokens, cache, start_pos, last_only)

    def __call__(self, tokens, cache, start_pos, last_only):
        logits = self.one_call_logits(tokens, cache, start_pos, last_only)
        if logits is not None:
            return logits
        if self.step is None:  # compiled at its first call
            forward = Transformer.forward
            code = forward.__code__.replace(co_name=f"compiled_step_{next(_steps)}")
            fn = functools.partial(types.FunctionType(code, forward.__globals__, code.co_name, forward.__defaults__),
                                   self.model)
            self.step = torch.compile(fn, dynamic=True, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
            self.steps.append((self.seen, self.step))
        # fresh strides: a column sliced from the loop's token buffer would recompile the step
        return self.step(tokens.clone(memory_format=torch.contiguous_format), cache, start_pos, last_only)


class OneCallStep:
    """compile_decode's one-token step (and verification of up to 16 tokens) of a LLaMA-family model whose
    linear layers all run our kernels, int4 (vnni.cpp), bf16 or float32 (rows.cpp): every block in one C++ call
    (kernels/step.cpp: RMSNorm, the q|k|v stack, RoPE, the cache's write, the few-query attention, o, the
    gate|up stack, SwiGLU, down, the residual adds), where the torch.compile'd step spent as long again as
    its matmuls on its graph's code and dynamo's checks, and the eager bf16 step nearly as long on PyTorch's
    small operations; and nothing to compile. The call starts at the token ids and ends after the final norm; the
    head runs as forward runs it. Its logits are the eager step's within a bf16 rounding here and there, and
    in float32 the eager step's bit for bit (step.cpp says why; tests/test_one_call_step.py).
    `of` takes a model only as speed_up leaves an int4, bf16 or float32 checkpoint of that family (the layers'
    classes, their q|k|v and gate|up stacks valid, the norms in the model's dtype (bf16 for int4), head_dim a
    multiple of 16 up to 256, no q/k norm, an embedding of rows in that dtype or int8 codes, eval mode, float
    layers on our few-row route); a call only for batch 1 and a cache of that dtype on the CPU, else None:
    CompiledStep compiles (a verification: runs eager). A token's numbers do not
    depend on how many share its call (every kernel on the way computes a row as it would alone), so greedy
    speculative decoding with such a target gives its plain greedy output, as the exact mode
    (batch_invariant) makes the eager route do."""

    def __init__(self, model: Transformer, dtype: torch.dtype, step):
        self.model, self.dtype, self.step = model, dtype, step

    @classmethod
    def of(cls, model: Transformer) -> OneCallStep | None:
        cfg = model.config
        dtype = getattr(model.norm, "weight", model.tok_emb.weight).dtype  # the step's: its activations' and cache's
        if cfg.family != "llama" or cfg.qk_norm or cfg.head_dim % 16 or cfg.head_dim > 256 or not kernels_built() \
                or cfg.n_head > ATTENTION_GROUP * cfg.n_kv_head or any(m.training for m in model.modules()) \
                or dtype not in (torch.bfloat16, torch.float32):
            return None
        norms, weights, scale_zero, groups, biases = [], [], [], [], []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            if type(attn) is not GQADecodeAttention or type(mlp) is not SwiGLUMLP or type(block) is not Block:
                return None
            layers = [attn.q_proj, attn.k_proj, attn.v_proj]
            matrices = [cls._matrix(dtype, attn.qkv_stack, layers), cls._matrix(dtype, attn.o_proj),
                        cls._matrix(dtype, mlp.gate_up, [mlp.gate_proj, mlp.up_proj]),
                        cls._matrix(dtype, mlp.down_proj)]
            if None in matrices or attn.o_proj.bias is not None or mlp.down_proj.bias is not None:
                return None
            if not (cls._takes_norm(block.attn_norm, cfg, dtype) and cls._takes_norm(block.mlp_norm, cfg, dtype)):
                return None
            if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
                return None
            # the tensors themselves, not copies: a weight's `.data = ...` of the same shape is read at the next step
            norms += [block.attn_norm.weight, block.mlp_norm.weight]
            for w, sz, g in matrices:
                weights.append(w)
                scale_zero.append(sz)
                groups.append(g)
            bias = [p.bias for p in layers]
            if any(b is not None for b in bias):
                if any(b is None or b.dtype != dtype or not b.is_contiguous() for b in bias):
                    return None
                biases += bias
        ends = cls._ends(model, dtype)
        if (biases and len(biases) != 3 * len(model.blocks)) or ends is None:
            return None
        return cls(model, dtype, vnni().DecodeStep(norms + [model.norm.weight], weights, scale_zero, groups, biases,
                                                   *ends, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden,
                                                   cfg.norm_eps))

    @staticmethod
    def _matrix(dtype: torch.dtype, layer, parts: list[nn.Module] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
        """A layer (or, with parts, the stack of those layers) as step.cpp multiplies it, (weights, scale_zero,
        group size): our int4 kernel's codes, or a W of the step's dtype on our few-row route (no scale_zero,
        group 0, the bias left to the caller); None where it is neither."""
        if parts is not None:  # a stack: the layers' own, still valid
            if isinstance(layer, StackedLinear) and layer.holds(parts):
                layer = layer.linear
            elif not (isinstance(layer, StackedInt4) and layer.takes(None, parts)):
                return None
        if isinstance(layer, StackedInt4) or type(layer) is VNNIInt4Linear and layer.packed.dim() == 1:
            int4 = layer.packed, layer.scale_zero, layer.group_size
            return int4 if dtype == layer.scale_zero.dtype == torch.bfloat16 else None  # an int4 model's activations
        if StackedLinear.plain(layer) and layer.weight.dtype == dtype and layer.weight.is_contiguous() \
                and layer.weight.device.type == "cpu" and ours_for(dtype):
            return layer.weight, None, 0
        return None

    @staticmethod
    def _takes_norm(norm: nn.Module, cfg, dtype: torch.dtype) -> bool:
        """Whether step.cpp's RMSNorm computes this norm: an RMSNorm with a weight of the step's dtype and the
        model's eps; in float32 a FusedRMSNorm (the eager step's then runs step.cpp's own row function)."""
        return (type(norm) is FusedRMSNorm or type(norm) is RMSNorm and dtype == torch.bfloat16) \
            and norm.weight.dtype == dtype \
            and norm.weight.is_contiguous() and norm.eps == cfg.norm_eps

    @staticmethod
    def _ends(model: Transformer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The embedding's rows and scales for step.cpp (rows of the step's dtype: no scales; int8 codes, for a
        bf16 step: their bf16 scales), where it computes them as the model's own embedding does and the final
        norm is an RMSNorm it can take; else None."""
        emb = model.tok_emb
        if not (OneCallStep._takes_norm(model.norm, model.config, dtype) and type(model.drop) is nn.Dropout):
            return None
        if type(emb) is nn.Embedding and emb.weight.dtype == dtype and emb.weight.is_contiguous() \
                and emb.max_norm is None:  # max_norm: forward rescales rows
            return emb.weight, None
        if type(emb) is QuantEmbedding and emb.bits == 8 and emb.scales.dtype == dtype == torch.bfloat16 \
                and emb.weight.is_contiguous() and emb.scales.is_contiguous():
            return emb.weight, emb.scales
        return None

    def __call__(self, tokens: torch.Tensor, cache: KVCache, start_pos: int,
                 last_only: bool = False) -> torch.Tensor | None:
        """forward's logits for tokens (1, T <= 16) at start_pos.., their K/V written to the cache; None where
        this call is not for this step (forward's route then also raises what forward raises: a context
        overflow). A token id outside the vocabulary raises before anything is written (a negative one
        too, which the eager QuantEmbedding would take from the end). Each token's numbers are those of a
        one-token call at its position."""
        model, T = self.model, tokens.shape[1]
        if tokens.shape[0] != 1 or not 1 <= T <= ROWS_MAX or tokens.dtype != torch.long \
                or tokens.device.type != "cpu" or cache.k[0].dtype != self.dtype or cache.k[0].device.type != "cpu" \
                or start_pos + T > model.config.block_size:
            return None
        end = cache.check_write(1, start_pos, T)
        x = self.step(tokens, start_pos, model.rope_cos, model.rope_sin, cache.k, cache.v, last_only)  # normed
        cache.length = end
        return model.lm_head(x[None])


_steps = itertools.count()
ASSIGNED = "_minillm_assigned"  # in a module's __dict__: how many parameters, buffers and modules were assigned to it
# CompiledStep.state's readers of a module's __dict__
_ASSIGNED_COUNT = operator.methodcaller("get", ASSIGNED, 0)
_QKV_STACK, _GATE_UP = operator.methodcaller("get", "qkv_stack"), operator.methodcaller("get", "gate_up")
_TRAINING = operator.methodcaller("get", "training")  # None for a scripted module, which keeps it elsewhere
_FORWARD_HOOKS, _PRE_HOOKS = operator.itemgetter("_forward_hooks"), operator.itemgetter("_forward_pre_hooks")
_DATA_PTR = operator.methodcaller("data_ptr")


@functools.cache
def _count_assignments() -> None:
    """From now on count, on each module, the parameters, buffers and submodules assigned to it (PyTorch's
    global registration hooks), for CompiledStep.state: a model's count moves only with its own modules."""
    def count(module, *_):
        module.__dict__[ASSIGNED] = module.__dict__.get(ASSIGNED, 0) + 1
    hooks = torch.nn.modules.module
    for register in (hooks.register_module_parameter_registration_hook, hooks.register_module_buffer_registration_hook,
                     hooks.register_module_module_registration_hook):
        register(count)


def speed_up(model: Transformer) -> Transformer:
    """Give every plain nn.Linear the few-row route, every attention the GQA decode and prompt routes, every
    RMSNorm and SwiGLU the one-pass route and every CPU Int4Linear and Int8Linear our kernel where this
    CPU has it (kernels/), in place; a layer's q, k, v and its gate, up multiplied as one matrix each
    (StackedInt4 where our int4 kernel runs them, StackedLinear for float32 and bf16). And for the
    whole process: freed memory kept for reuse
    (host_memory.reuse_freed_memory)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowLinear
        elif type(module) is Attention:
            module.__class__ = GQADecodeAttention
        elif type(module) is RMSNorm:
            module.__class__ = FusedRMSNorm
        elif type(module) in (Int4Linear, Int8Linear):
            use_kernel(module)
    forget_torch_layouts()
    for module in model.modules():
        if isinstance(module, GQADecodeAttention) and module.qkv_stack is None:
            parts = [module.q_proj, module.k_proj, module.v_proj]
            module.qkv_stack = StackedInt4.of(parts) or StackedLinear.of(parts)
        elif type(module) is MLP and module.family == "llama":
            parts = [module.gate_proj, module.up_proj]
            module.__class__, module.gate_up = SwiGLUMLP, StackedInt4.of(parts) or StackedLinear.of(parts)
    release_freed_memory()  # the layers' own buffers, now replaced by views of the stacks
    reuse_freed_memory()  # from now on: a prefill's activations are not mapped afresh at every use
    return model


def batch_invariant(model: Transformer, rows: int | None) -> Transformer:
    """Make each token's logits independent of how many tokens share a call, in place (see the top):
    float matmuls in blocks of `rows` rows (of up to 16, unpadded, where they take our kernel), attention
    one query row at a time; calls with grad unchanged. rows = k + 1 verifies k drafts in one block; off
    our kernel a one-token step then costs a `rows`-row call. A
    matrix whose kernel rounds a row by its place in a block of `rows` (bf16 on some shapes and
    CPUs: steady_block) gets the next block size that does not. rows=None turns the mode off."""
    if rows is not None and rows < 1:
        raise ValueError(f"batch_invariant rows must be >= 1, got {rows}")
    if rows is not None and isinstance(model, CompiledDecode) and model.compiled_step.graph:
        raise ValueError("batch_invariant: the model's one-token step is compiled (compile_decode), and a compiled "
                         "step rounds differently from the eager verification; use one or the other")
    speed_up(model)
    swap = {FewRowLinear: BlockedLinear, GQADecodeAttention: OneQueryAttention}
    if rows is None:
        swap = {new: old for old, new in swap.items()}
    for name, module in model.named_modules():
        module.__class__ = swap.get(type(module), type(module))
        if isinstance(module, BlockedLinear):
            module.rows = steady_block(module, rows, name)
    return model


def steady_block(lin: FewRowLinear, rows: int, name: str = "a linear layer") -> int:
    """The smallest block size r in rows..max(2*rows, 16) for which lin's kernel gives a row the same
    numbers at every place in an r-row block whatever the other rows hold, probed once per weight
    shape, dtype and r (_places_agree). bf16 at 5 rows on an AVX-512 Xeon: place 3 of 5 rounds
    differently in about 1 output in 5,000, hence the probe's size."""
    largest = max(2 * rows, 16)
    for r in range(rows, largest + 1):
        key = (tuple(lin.weight.shape), lin.weight.dtype, lin.weight.device.type, lin.packed is not None, r)
        if key not in _STEADY:
            _STEADY[key] = _places_agree(lin, r)
        if _STEADY[key]:
            return r
    raise ValueError(f"batch_invariant: {name} ({lin.out_features} x {lin.in_features}, {lin.weight.dtype}) rounds a "
                     f"row differently by its place in every block of {rows} to {largest} rows on this machine")


_STEADY: dict[tuple, bool] = {}
PROBE_OUTPUTS = 1 << 16  # outputs compared per place in a block (a 1-in-5,000 difference shows ~13 times)


def _places_agree(lin: FewRowLinear, r: int) -> bool:
    """Each place 1..r-1 of an r-row block against place 0, for the same row among other random rows
    (or zero padding), until PROBE_OUTPUTS outputs per place agreed; False at the first difference."""
    g = torch.Generator(device=lin.weight.device).manual_seed(0)
    new = lambda: torch.randn(r, lin.in_features, generator=g, device=lin.weight.device).to(lin.weight.dtype)
    with torch.inference_mode():
        for trial in range(-(-PROBE_OUTPUTS // lin.out_features)):
            block = new()
            first = FewRowLinear.forward(lin, block)[0]
            for place in range(1, r):
                others = new() if trial % 4 else torch.zeros_like(block)  # random rows, or padding
                others[place] = block[0]
                if not torch.equal(FewRowLinear.forward(lin, others)[place], first):
                    return False
    return True


def version(t: torch.Tensor) -> int | None:
    """t's in-place write counter; None for a tensor made in inference mode, which keeps none."""
    return None if t.is_inference() else t._version


def prepack(model: Transformer) -> int:
    """Reorder every FewRowLinear's float32 weight once into oneDNN's layout for few rows (what
    torch.compile's freezing does), where the route is oneDNN's (not ours) -> bytes added. A second copy of
    each matrix (the model's fp32 size again), for 4..16 rows at 1.2-1.4x a row's time instead of
    1.4-1.6x on W as it is (`python -m bench.step_cost few-rows`). A weight changed in place later
    is seen (its _version moves) and multiplied as it is; call speed_up(model) first."""
    added = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, FewRowLinear) and w.dtype == torch.float32 and w.device.type == "cpu" \
                and few_row_route(w.dtype) == "onednn":
            module.packed = (torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8), version(w))
            added += w.numel() * w.element_size()
    return added


def compile_decode(model: Transformer, one_call: bool = True, graph: bool = True) -> Transformer:
    """From now on run one-token cached calls without grad through torch.compile, in place (see above),
    or, for a LLaMA-family model on our kernels (int4, bf16 or float32 layers; OneCallStep.of says which),
    unless one_call is False, through OneCallStep's one C++ call (verifications of up to 16 tokens too).
    With graph False nothing is compiled: what OneCallStep does not take runs eager (speed_layer). The
    compile itself happens at the first call that needs it: warm_up(model) makes that call now."""
    model.compiled_step = CompiledStep(model, one_call, graph)
    model.__class__ = CompiledDecode
    return model


def speed_layer(model: Transformer, graph: bool = False) -> Transformer:
    """The speed layer as the commands run it (sample.py, the eval and the server, unless --reference), in
    place: speed_up, and, where OneCallStep takes the model as it is now, decode steps and verifications
    through its one call (nothing to compile: 0.0-0.2 s), the calls it does not take eager; with graph
    (sample.py's --compile) the one-token steps it does not take through torch.compile's graph. A model it
    does not take stays as speed_up leaves it (no check of its state at each step: 2-7% of a small GPT-2's)."""
    speed_up(model)
    if graph or OneCallStep.of(model) is not None:
        compile_decode(model, graph=graph)
    return model


def warm_up(model: Transformer) -> float:
    """Compile a compile_decode model's one-token step now, on a short throwaway cache, instead of in
    the middle of the first decode (where it was counted as decoding time) -> the seconds it took. Two
    graphs: a step with room left in the cache, and the step that fills it (a loop's last)."""
    t0 = time.perf_counter()
    with torch.inference_mode():  # as the decode loops call it (generate.next_logits): no guard differs
        device = model.tok_emb.weight.device
        cache = KVCache.for_model(model, 1, min(8, model.config.block_size))
        model(torch.zeros(1, 2, dtype=torch.long, device=device), cache, 0, last_only=True)  # eager prefill
        model(torch.zeros(1, 1, dtype=torch.long, device=device), cache, 2, last_only=True)  # compiles
        # and the step that fills a cache's last position, which the first graph does not take (the cache
        # then a whole tensor: dynamo specializes on it); decoding loops size caches to end there (for_run)
        if cache.max_len > 3:
            model(torch.zeros(1, cache.max_len - 3, dtype=torch.long, device=device), cache, 3, last_only=True)
            model(torch.zeros(1, 1, dtype=torch.long, device=device), cache, cache.max_len - 1, last_only=True)
    return time.perf_counter() - t0
