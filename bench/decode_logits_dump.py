"""Dump the static decoder's logits for the default job's cache size, to compare two versions of
agro.fast_decode bit for bit: SmolLM2-135M in bf16, 32 rows of 38-token prompts (random ids,
five rows left-padded by 3), 32 decode steps over fixed random tokens (a 70-column cache).

    PYTHONPATH=<checkout A>/src .venv/bin/python bench/decode_logits_dump.py a.pt
    PYTHONPATH=<checkout B>/src .venv/bin/python bench/decode_logits_dump.py b.pt
    .venv/bin/python -c "import torch; print(torch.equal(torch.load('a.pt'), torch.load('b.pt')))"

(docs/RESULTS.md, "2026-12-04 (fifth)": f3419d4 against fa7fd8c's rule, True.)"""
import sys, torch
import agro.fast_decode as fd
from agro.models import DEFAULT_MODEL, bf16_copy, load_model
from agro.logprobs import position_ids_from_mask
print("agro.fast_decode from", fd.__file__)
torch.manual_seed(0)
m = bf16_copy(load_model(DEFAULT_MODEL).eval())
B, P, T = 32, 38, 32
ids = torch.randint(100, 40000, (B, P)); am = torch.ones(B, P, dtype=torch.long)
am[:5, :3] = 0   # some left padding
toks = torch.randint(100, 40000, (T, B))
with torch.no_grad():
    cache = m(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=True).past_key_values
    dec = fd.StaticDecoder.from_prefill(m, cache, am, T)
    pos = am.sum(-1)
    out = torch.stack([dec.step(toks[t], pos + t) for t in range(T)])
torch.save(out, sys.argv[1])
