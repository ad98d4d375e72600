"""The first start-up's GGUF conversion (agro.models.converted_gguf into an empty cache), with
and without agro.models.one_gguf_reader: interleaved rounds, each conversion in a fresh
process (imports and transformers' lazy modules paid alike), its wall time and how many
gguf.GGUFReader objects (each parses all of the file's metadata) and tensor-name maps gguf built.

    .venv/bin/python bench/gguf_convert.py --rounds 3 [--json docs/bench/gguf/convert.json]

Run it alone on the machine (two torch processes on 2 cores slow each other down).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abrounds import medians, order, write_json  # noqa: E402


def child(arm: str, cache: str) -> None:
    """One conversion into ``cache``; prints {"seconds", "readers", "name_maps"} as JSON."""
    import os
    import time

    os.environ["AGRO_CACHE_DIR"] = cache
    import gguf

    from agro import models

    counts = {"readers": 0, "name_maps": 0}
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def counted_reader(*a, **kw):
        counts["readers"] += 1
        return reader(*a, **kw)

    def counted_map(*a, **kw):
        counts["name_maps"] += 1
        return name_map(*a, **kw)

    # count the real constructions: under the memo only its misses reach these
    gguf.GGUFReader, gguf.get_tensor_name_map = counted_reader, counted_map
    if arm == "before":
        models.one_gguf_reader = contextlib.nullcontext
    path = models.default_gguf_path()
    t = time.perf_counter()
    out = models.converted_gguf(path)
    seconds = time.perf_counter() - t
    assert out is not None and models._copy_complete(out), out
    print(json.dumps({"seconds": seconds, **counts}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.cache)
    import torch

    from agro.perf import machine_key

    cpu = machine_key()
    print(f"CPU: {cpu}")
    rows: dict[str, list] = {"before": [], "after": []}
    counts: dict[str, list] = {"before": [], "after": []}
    for r in range(a.rounds):
        for arm in order(r, "before", "after"):
            with tempfile.TemporaryDirectory(prefix="agro-gguf-bench-") as cache:
                out = subprocess.run([sys.executable, __file__, "--child", arm, "--cache", cache],
                                     capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            rows[arm].append(res["seconds"])
            counts[arm].append({"readers": res["readers"], "name_maps": res["name_maps"]})
            print(f"round {r} {arm:6s} {res['seconds']:6.2f} s  (GGUFReaders {res['readers']}, "
                  f"tensor-name maps {res['name_maps']})", flush=True)
    med = medians(rows)
    print(f"medians: before {med['before']:.2f} s, after {med['after']:.2f} s, "
          f"after/before {med['after'] / med['before']:.3f}")
    write_json(a.json, cpu, "fp32", torch.__version__, rows, med, counts=counts)


if __name__ == "__main__":
    main()
