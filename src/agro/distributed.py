"""Data-parallel bookkeeping: ranks, the process's device, and the few collectives the trainer uses.

Each process holds whole groups and may end a step with fewer groups than the others, or none
(prompts too long, gold answers that do not parse). So nothing is averaged per process:
gradients and metrics are *summed* over processes after each process weighted its own samples
by ``1 / (global sample count)``, which makes N processes equal one process on the union of
their groups. A process with no groups still joins every collective (with zero gradients), so
no all-reduce waits forever for it.

Launch with ``accelerate launch --multi_gpu --num_processes N -m agro.cli train ...``; without a
launcher this is one process and every collective is a no-op.

Departure from the paper: none (the paper does not describe its distribution).
"""
from __future__ import annotations

import torch


class Distributed:
    """Process-group bookkeeping via accelerate (a single process when not launched)."""

    def __init__(self):
        from accelerate import PartialState

        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index
        self.world = self.state.num_processes
        self.device = self.state.device
        self.is_main = self.state.is_main_process

    def sum_int(self, value: int) -> int:
        """Sum of an integer over processes."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        return int(round(t.item()))

    @property
    def _comm_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def all_reduce_sum_grads_(self, params: list[torch.nn.Parameter]) -> None:
        """Sum ``p.grad`` over processes in place, for every parameter in ``params`` (same list, in
        the same order, on every process). A parameter without a gradient (this process had no
        groups, or the parameter was unused) joins with zeros, so every process sends the same
        tensors and no collective hangs."""
        if self.world == 1 or not params:
            return
        has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        torch.distributed.all_reduce(has)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        i = 0
        for p, h in zip(params, has.tolist()):
            p.grad.copy_(flat[i:i + p.numel()].view_as(p.grad))
            i += p.numel()
            if h == 0:      # no process produced a gradient: leave it None, as one process would
                p.grad = None

    def weighted_mean(self, sums: dict[str, float], weight: float) -> dict[str, float]:
        """Global weighted means: every process passes ``sums[k] = sum_i w_i * x_i`` over its own
        items and its total weight ``weight = sum_i w_i``; returns ``sum over processes of sums[k]
        / total weight``. Keys may differ between processes (a process with no items passes {}):
        a key is averaged over the processes that have it, by their weights."""
        gathered = [(dict(sums), float(weight))]
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, (dict(sums), float(weight)))
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for d, w in gathered:
            for k, v in d.items():
                num[k] = num.get(k, 0.0) + float(v)
                den[k] = den.get(k, 0.0) + w
        return {k: (num[k] / den[k] if den[k] > 0 else float("nan")) for k in num}

    def sum_dict(self, d: dict[str, float]) -> dict[str, float]:
        """Per-key sums over processes (keys may differ between processes)."""
        if self.world == 1:
            return dict(d)
        gathered = [None] * self.world
        torch.distributed.all_gather_object(gathered, dict(d))
        out: dict[str, float] = {}
        for g in gathered:
            for k, v in g.items():
                out[k] = out.get(k, 0.0) + float(v)
        return out

    def all_gather(self, obj) -> list:
        """``obj`` of every process, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (what the others pass is ignored)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
