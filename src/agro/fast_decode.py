"""One-token decode steps on a preallocated KV cache, for the Llama-family decoders.

Why: a decode step of ``model(...)`` with transformers' ``DynamicCache`` spends most of its time
outside the weight matmuls. Measured on SmolLM2-135M in bf16, 32 rows, ~70 cached tokens, 2 cores
(AMD EPYC Zen 4): 130-140 ms per step, of which the linear layers are ~64 ms; SDPA's CPU flash
kernel with a one-token query took ~37 ms, the cache's ``torch.cat`` and the mask and RoPE
bookkeeping most of the rest (``bench/phases.py`` times both paths side by side: 1.36x per
sampled token in bf16, 1.01x in fp32, docs/RESULTS.md).

What this does instead, per step:

* keys and values go into a cache allocated once per sampling call (values ``[layers, rows,
  kv_heads, prompt + max_new_tokens, head_dim]``, keys stored transposed ``[..., head_dim,
  prompt + max_new_tokens]``); a step writes one column, with no concatenation;
* attention is two batched matmuls over the cache's written columns, rounded up to a multiple of
  :data:`SLICE_COLUMNS` (the whole cache when that would leave fewer than SLICE_COLUMNS unread),
  with the key/value heads' query groups stacked (no ``repeat_kv`` copy) and an additive mask
  (the prompts' left padding and the columns not written yet), the scores scaled and
  soft-maxed in fp32;
* the cache is bf16 for bf16 weights (their keys and values are bf16 values, so storing them in
  fp32 added no precision, and long completions' steps were bound by reading it) and fp32
  otherwise (fp32 weights; fp16 keys are cast). With a bf16 cache the two matmuls run in bf16,
  which rounds the scores to bf16 as transformers' eager attention does (then they are scaled,
  masked and soft-maxed in fp32; eager scales and masks in bf16), and the weights are rounded
  to bf16 for the values' matmul; with fp32 weights all of it is fp32;
* the weight matmuls (q/k/v, o, gate/up, down, LM head) run on :class:`PackedWeights`, the
  model's weights of the moment reordered once per sampling call for oneDNN's GEMM (1.7-1.95x
  faster matmuls at 32-8 rows in fp32, 1.38-1.69x in bf16, on Zen 4), where
  :func:`packing_applies`;
  otherwise on the model's own projection and MLP modules;
* everything else calls the model's own modules (RMSNorm, rotary embedding, the MLP's
  activation, final norm), so the numbers are the model's up to float rounding
  (``tests/test_fast_decode.py`` holds the logits against ``model(...)`` in fp32 and bf16, on
  packed weights and on the modules).

Only plain decoder-only models of the Llama family are taken (:func:`supports`); anything else
(LoRA-wrapped, sliding-window, QK-norm, other layouts) keeps the transformers path, and so do
GPUs (:func:`applies`; never measured there). The prompt's prefill is transformers' own forward;
its cache is copied into the static one. Memory: the cache is sized for the prompt plus
``max_new_tokens`` (for SmolLM2-135M, 32 rows x 72 columns: 106 MB in fp32, 53 MB in bf16, keys
and values). Finished
rows stay in the cache and decode a dummy token (:meth:`StaticDecoder.step_rows`) until the
sampler drops them (:meth:`StaticDecoder.select` copies the kept rows; ``CachedGenerator`` does
it once a quarter of the rows are done). Models split over devices (``device_map``) are not supported: agro never loads one.
"""

from __future__ import annotations

import os

import torch

from .models import hf_model, hook_free, plain_linear

# model_type -> the module layout below (decoder layers with input_layernorm, self_attn.{q,k,v,o}_proj,
# post_attention_layernorm, mlp; model.norm; lm_head; model.rotary_emb(x, position_ids) -> cos, sin).
_SUPPORTED = ("llama", "qwen2")

# A step's attention reads the first ``filled`` columns rounded up to a multiple of this, when
# that leaves at least this many columns of the cache unread; otherwise all of them (the columns
# read but not written are masked). Measured on Zen 4 (bench/probe_cache_attention.py, one
# step's 30 layers at 32 rows, three runs in docs/bench/decode/): 256 of 400 columns took
# 0.80-0.86x (fp32) and 0.84-0.92x (bf16) the time of all 400, 448 of 800 0.62-0.87x and
# 0.59-0.66x (one bf16 run 1.50x: the VM's noise, as its other rows show). A cache of fewer
# than 2 x SLICE_COLUMNS columns (the default job's ~70) is read whole, as before 2026-12-04.
SLICE_COLUMNS = 64
# bf16 weights keep a bf16 cache. False: an fp32 cache and attention whatever the weights (the
# code before 2026-12-04; the benches' `before` arms and tests set it).
BF16_CACHE = True
# The decode step's weight matmuls on weights reordered once per sampling call for oneDNN
# (:class:`PackedWeights`). False: ``F.linear`` on the modules' own weights (the code before
# 2026-12-05); ``AGRO_PACKED_DECODE=0`` in the environment when agro is imported sets it (any
# other value leaves it on); benches and tests set it.
PACKED_WEIGHTS = os.environ.get("AGRO_PACKED_DECODE", "1") != "0"
# A sampling call packs only when it may decode at least this many tokens per row: packing
# costs what packed matmuls save in 5-6 decode steps at 32 rows (fp32 210 ms against 42 ms a
# step, bf16 63 against 11: docs/bench/packed_decode/decode_probes.json, Zen 4).
PACK_MIN_NEW_TOKENS = 8


def supports(model) -> bool:
    """True if :class:`StaticDecoder` can run ``model`` (not a peft model; Llama-family layout)."""
    from .models import is_peft

    if is_peft(model):
        return False
    m = hf_model(model)
    cfg = getattr(m, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _SUPPORTED:
        return False
    if getattr(cfg, "use_sliding_window", False):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    inner = getattr(m, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(m, "lm_head"):
        return False
    layer = inner.layers[0]
    att = layer.self_attn
    return all(hasattr(att, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")) and \
        not hasattr(att, "q_norm") and hasattr(layer, "input_layernorm") and hasattr(layer, "mlp")


def applies(model, precision: str) -> bool:
    """Whether agro's samplers decode ``model`` on the static cache: a supported model
    (:func:`supports`) on a CPU, and, for bf16 sampling, with bf16 weights (the static path runs
    without autocast). GPUs keep transformers' cache and fused attention: the static path was
    measured on CPUs only."""
    from .models import device_of, is_bf16

    return supports(model) and device_of(model).type == "cpu" and \
        (precision != "bf16" or is_bf16(model))


def _swiglu_forwards() -> tuple:
    """The MLP forwards known to compute ``down(act(gate(x)) * up(x))``: transformers' Llama and
    Qwen2 MLPs and agro.lean's (which every agro model runs)."""
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    from . import lean

    return (LlamaMLP.forward, Qwen2MLP.forward, lean._lean_mlp_forward)


def _packable_layout(model) -> bool:
    """Every matmul :class:`PackedWeights` replaces is a plain ``nn.Linear`` without hooks
    (:func:`agro.models.plain_linear`), of the same shapes in every layer, and each MLP, without
    hooks itself, has a forward known to be ``down(act(gate(x)) * up(x))``
    (:func:`_swiglu_forwards`)."""
    m = hf_model(model)
    if not plain_linear(getattr(m, "lm_head", None)):
        return False
    known, shapes = _swiglu_forwards(), None
    for layer in m.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        mods = [getattr(att, a, None) for a in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
            [getattr(mlp, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
        if not all(plain_linear(x) for x in mods) or type(mlp).forward not in known \
                or not hook_free(mlp) or not callable(getattr(mlp, "act_fn", None)):
            return False
        here = [tuple(x.weight.shape) for x in mods]
        if shapes is not None and here != shapes:
            return False
        shapes = here
    return True


def _available_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Memory this process may still take: /proc/meminfo's MemAvailable, capped by a cgroup v2
    limit where one is set (memory.max - memory.current: containers, CI); None where neither
    can be read (not Linux)."""
    free = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"{cgroup}/memory.max") as f:
            limit = f.read().strip()
        with open(f"{cgroup}/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            left = max(0, int(limit) - used)
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def packing_applies(model) -> bool:
    """Whether the decode step can run on :class:`PackedWeights`: :data:`PACKED_WEIGHTS` on, a
    model :func:`supports` takes, on a CPU with oneDNN, its weights fp32 (or bf16 where oneDNN
    runs bf16 GEMMs), a layout of plain linear layers (:func:`_packable_layout`)."""
    if not PACKED_WEIGHTS or not supports(model) or not torch.backends.mkldnn.is_available():
        return False
    ps = [p for p in hf_model(model).parameters() if p.is_floating_point()]
    dtypes = {p.dtype for p in ps}
    if not ps or len(dtypes) != 1 or any(p.device.type != "cpu" for p in ps):
        return False
    dtype = dtypes.pop()
    if dtype not in (torch.float32, torch.bfloat16) or (
            dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    return _packable_layout(model)


class PackedWeights:
    """The decode step's weight matmuls, reordered once for oneDNN's GEMM (the layout inductor's
    freezing pass gives CPU linear layers): per layer the q, k and v projections as one matrix,
    gate and up as one, o and down; and the LM head. Built from the model's weights of the
    moment (:meth:`current` says whether they are still those: an optimizer step or a
    ``refresh`` of bf16 working weights writes them in place, which bumps each tensor's version).

    Why: a decode step multiplies M = 32 rows (fewer as samples finish) by every weight, and at
    that M ``F.linear`` reaches about half the GEMM peak. Measured on SmolLM2-135M's decode
    matmuls, 2 cores, AMD EPYC Zen 4 (``.venv/bin/python bench/decode_probes.py``,
    docs/bench/packed_decode/decode_probes.json): at M = 32 fp32 101.5 ms with ``F.linear``
    against 59.8 ms packed and stacked (1.70x; 1.95x at M = 8), bf16 41.2 against 29.9 ms (1.38x;
    1.69x at M = 8), for 210 ms (fp32) and 63 ms (bf16) of packing; a default-job sampling call
    (``bench/packed_decode_ab.py``) took 0.71x as long in fp32 and 0.89x in bf16. bf16 outputs
    were bit-identical to ``F.linear``'s on the unstacked matrices, and the bf16 sampling call drew
    the same tokens; fp32 ones differ by float rounding (largest error against fp64 1.3e-6 of the
    largest output, ``F.linear``'s 5.7e-7). Memory: one more copy of
    the weights (538 MB fp32, 269 MB bf16 on SmolLM2-135M) while a sampling call runs; not made
    when it would take more than half the memory available (:meth:`of`). Not measured on other
    CPU kinds; :data:`PACKED_WEIGHTS` (``AGRO_PACKED_DECODE=0``) turns it off.
    "Written in place" means through the parameter (optimizer steps, ``copy_``, agro's syncs and
    refreshes all write that way); a write through ``p.data`` has its own version counter and is
    not seen.

    Shapes: :meth:`linear` takes x [b, in] and returns [b, out] in x's dtype.
    """

    def __init__(self, model):
        m = hf_model(model)
        self._params = list(m.parameters())
        self._versions = self._stamp()
        att0 = m.model.layers[0].self_attn
        self.qkv_split = (att0.q_proj.out_features, att0.k_proj.out_features,
                          att0.v_proj.out_features)
        self.inter = m.model.layers[0].mlp.gate_proj.out_features
        self.qkv, self.o, self.gate_up, self.down = [], [], [], []
        with torch.no_grad():
            for layer in m.model.layers:
                att, mlp = layer.self_attn, layer.mlp
                self.qkv.append(self._pack(att.q_proj, att.k_proj, att.v_proj))
                self.o.append(self._pack(att.o_proj))
                self.gate_up.append(self._pack(mlp.gate_proj, mlp.up_proj))
                self.down.append(self._pack(mlp.down_proj))
            self.head = self._pack(m.lm_head)

    @staticmethod
    def _pack(*mods: torch.nn.Linear):
        """The modules' weights stacked along their outputs, reordered for oneDNN; their biases
        stacked (a module without one contributes zeros), or None if none has one."""
        w = mods[0].weight if len(mods) == 1 else torch.cat([m.weight for m in mods], 0)
        if all(m.bias is None for m in mods):
            b = None
        else:
            b = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                           for m in mods], 0)
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 32), b

    def _stamp(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self._params]

    def current(self, model) -> bool:
        """True while ``model``'s weights are the ones packed (same tensors, not written since)."""
        ps = list(hf_model(model).parameters())
        return len(ps) == len(self._params) and all(a is b for a, b in zip(ps, self._params)) \
            and self._stamp() == self._versions

    @staticmethod
    def linear(x: torch.Tensor, wb) -> torch.Tensor:
        w, b = wb
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    @classmethod
    def of(cls, model) -> "PackedWeights | None":
        """Packed weights for ``model`` where :func:`packing_applies` and the copy would take at
        most half the memory available now (:func:`_available_bytes`, where it can be read),
        else None."""
        if not packing_applies(model):
            return None
        size = sum(p.numel() * p.element_size() for p in hf_model(model).parameters())
        free = _available_bytes()
        return cls(model) if free is None or size <= free // 2 else None


def columns_read(filled: int, cap: int) -> int:
    """How many of a ``cap``-column cache's leading columns a step reads when ``filled`` of them
    hold keys: ``filled`` rounded up to a multiple of :data:`SLICE_COLUMNS` if that leaves at
    least SLICE_COLUMNS columns unread, else all ``cap``."""
    n = -(-filled // SLICE_COLUMNS) * SLICE_COLUMNS
    return cap if n + SLICE_COLUMNS > cap else n


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class StaticDecoder:
    """Decode state for one sampling call: ``rows`` sequences, each a left-padded prompt of
    ``P`` columns plus at most ``max_new`` generated tokens.

    Build it from transformers' prefill cache (:meth:`from_prefill`), then call :meth:`step` (all
    rows) or :meth:`step_rows` (the live rows only) once per generated token; :meth:`select`
    keeps a subset of rows (finished samples leave).
    """

    def __init__(self, model, keys: list[torch.Tensor], values: list[torch.Tensor],
                 prompt_mask: torch.Tensor, max_new: int, packed: "PackedWeights | None" = None):
        m = hf_model(model)
        self.lm = m
        if packed is not None and not packed.current(model):
            raise RuntimeError("StaticDecoder: the packed weights are not the model's current ones")
        self.packed = packed
        self.layers = list(m.model.layers)
        att = self.layers[0].self_attn
        self.head_dim = int(att.head_dim)
        self.kv_heads = int(keys[0].shape[1])
        self.scaling = float(att.scaling)
        B, _, P, _ = keys[0].shape
        self.P = int(P)
        cap = self.P + int(max_new)
        dev = keys[0].device
        # the cache in the dtype its keys and values are computed in (bf16 weights: bf16), else fp32
        dt = torch.bfloat16 if BF16_CACHE and keys[0].dtype == torch.bfloat16 else torch.float32
        L = len(self.layers)
        # keys transposed [L, B, kvh, hd, cap] and values [L, B, kvh, cap, hd]: both matmuls of
        # the attention then read contiguous operands (a transposed view is copied by bmm).
        # Columns >= P are written one per step.
        self.k = torch.zeros((L, B, self.kv_heads, self.head_dim, cap), dtype=dt, device=dev)
        self.v = torch.zeros((L, B, self.kv_heads, cap, self.head_dim), dtype=dt, device=dev)
        for i in range(L):
            self.k[i, :, :, :, :P] = keys[i].transpose(-1, -2)      # (cast if dtypes differ)
            self.v[i, :, :, :P] = values[i]
        # additive key mask [B, 1, 1, cap]: 0 where a column holds a key of the row, a large
        # negative number for the prompts' left padding and for the columns not written yet.
        # A step reads a slice of the columns (SLICE_COLUMNS), so the mask is sliced with them.
        mask = torch.full((B, 1, 1, cap), torch.finfo(torch.float32).min, device=dev)   # fp32
        mask[:, 0, 0, :P].masked_fill_(prompt_mask.to(dev) != 0, 0)
        self.mask = mask
        self.filled = self.P          # columns holding keys/values

    @classmethod
    def from_prefill(cls, model, cache, prompt_mask: torch.Tensor, max_new: int,
                     packed: "PackedWeights | None | str" = "auto") -> "StaticDecoder":
        """``cache``: transformers' cache after the prompt's forward (rows already repeated).
        ``packed``: the model's :class:`PackedWeights` (a sampler packs once per call and hands
        them to each decoder it builds), None for the modules' own weights, or "auto": packed
        here where :func:`packing_applies`."""
        if isinstance(packed, str):
            if packed != "auto":
                raise ValueError(f"packed={packed!r}: PackedWeights, None or 'auto'")
            packed = PackedWeights.of(model)
        layers = cache.layers
        return cls(model, [c.keys for c in layers], [c.values for c in layers], prompt_mask,
                   max_new, packed)

    @property
    def rows(self) -> int:
        return int(self.v.shape[1])

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows ``idx`` (long [b']) in this order (copies the kept rows' cache)."""
        self.k = self.k[:, idx]
        self.v = self.v[:, idx]
        self.mask = self.mask[idx]

    def step_rows(self, slot: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """:meth:`step` for the live rows ``slot`` (long [b], distinct rows of this cache) only:
        tok, pos [b] -> logits [b, V]. The other rows (finished samples not dropped yet: dropping
        copies the whole cache, so the sampler does it only once a quarter of the rows are done)
        decode a dummy token whose keys, values and logits nobody reads."""
        if len(slot) == self.rows and bool((slot == torch.arange(self.rows, device=slot.device)).all()):
            return self.step(tok, pos)              # every row live, in order: nothing to scatter
        full_tok = tok.new_zeros(self.rows)
        full_pos = pos.new_zeros(self.rows)
        full_tok[slot] = tok
        full_pos[slot] = pos
        return self.step(full_tok, full_pos)[slot]

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok [b] long (the last token of every live row), pos [b] long (its position id) ->
        next-token logits [b, V] in the model's dtype. Writes column ``filled`` of the cache."""
        b = tok.shape[0]
        c = self.filled
        if c >= self.v.shape[3]:
            raise RuntimeError("StaticDecoder: more steps than max_new_tokens")
        inner = self.lm.model
        h = inner.embed_tokens(tok[:, None])                            # [b, 1, H]
        cos, sin = inner.rotary_emb(h, pos[:, None])                     # [b, 1, hd] each
        kvh, hd = self.kv_heads, self.head_dim
        self.mask[:, :, :, c] = 0
        n = columns_read(c + 1, self.v.shape[3])
        mask = self.mask[..., :n]                                        # [b, 1, 1, n] fp32
        dt = self.k.dtype                                                # the cache's dtype
        pw = self.packed
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)                                 # [b, 1, H]
            if pw is None:
                q = att.q_proj(x).view(b, -1, hd)                        # [b, nh, hd]
                k = att.k_proj(x).view(b, kvh, hd)                       # [b, kvh, hd]
                v = att.v_proj(x).view(b, kvh, hd)
            else:
                q, k, v = pw.linear(x.view(b, -1), pw.qkv[i]).split(pw.qkv_split, dim=-1)
                q, k, v = q.reshape(b, -1, hd), k.reshape(b, kvh, hd), v.reshape(b, kvh, hd)
            q = q * cos + _rotate_half(q) * sin                          # [b, nh, hd]
            k = k * cos + _rotate_half(k) * sin
            self.k[i, :, :, :, c] = k
            self.v[i, :, :, c] = v
            qg = q.view(b, kvh, -1, hd).to(dt)                           # [b, kvh, g, hd]
            w = torch.matmul(qg, self.k[i][..., :n]).float() * self.scaling   # [b, kvh, g, n] fp32
            w = torch.softmax(w + mask, dim=-1).to(dt)
            a = torch.matmul(w, self.v[i][:, :, :n]).reshape(b, 1, -1)    # [b, 1, nh*hd]
            if pw is None:
                h = h + att.o_proj(a.to(h.dtype))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                continue
            h = h + pw.linear(a.to(h.dtype).view(b, -1), pw.o[i]).view(b, 1, -1)
            x = layer.post_attention_layernorm(h).view(b, -1)            # [b, H]
            g, u = pw.linear(x, pw.gate_up[i]).split(pw.inter, dim=-1)    # [b, I] each
            h = h + pw.linear(layer.mlp.act_fn(g) * u, pw.down[i]).view(b, 1, -1)
        self.filled = c + 1
        h = inner.norm(h)
        if pw is not None:
            return pw.linear(h.view(b, -1), pw.head)                     # [b, V]
        return self.lm.lm_head(h)[:, 0]                                  # [b, V]
