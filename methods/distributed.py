"""Data-parallel plumbing shared by the trainers (DPO, the on-policy engine) and the harness, on top of ``torch.distributed``.

The process group is created by ``accelerate launch`` + ``accelerate.Accelerator()`` / ``PartialState()``;
nothing here launches processes or initialises a group. With one process (the default, and whenever
``torch.distributed`` is not initialised) every helper is the identity / a no-op, so the single-process code
path and its numbers are unchanged.

Conventions (what makes a multi-process run equal a single-process one):
  * a global batch of ``n`` rows is split into ``world_size`` contiguous, equal shards in rank order
    (``shard``); gathering the shards rank by rank (``gather_rows``) gives back the global order;
  * a mean over a global batch is formed as ``all_reduce_sum(sum of local terms) / global count``;
  * every rank holds the full parameters (DDP-style): gradients are summed / averaged across ranks before the
    optimiser step, so every rank applies the same update and the replicas stay equal.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist


class Dist:
    """Rank / world size of the current process group and the few collectives the trainers need.

    ``Dist()`` reads ``torch.distributed`` (world size 1 when it is not initialised); ``Dist.single()`` is a
    one-process view whatever the environment (a trainer built without an accelerator stays single-process)."""

    def __init__(self, *, force_single: bool = False) -> None:
        on = not force_single and tdist.is_available() and tdist.is_initialized()
        self.rank = tdist.get_rank() if on else 0
        self.world_size = tdist.get_world_size() if on else 1

    @classmethod
    def single(cls) -> Dist:
        return cls(force_single=True)

    @classmethod
    def from_accelerator(cls, accelerator) -> Dist:
        """The view of an ``accelerate.Accelerator`` (single process if it is None or has one process)."""
        if accelerator is None or accelerator.num_processes == 1:
            return cls.single()
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- sharding
    def shard(self, n: int, what: str = "batch") -> slice:
        """This rank's contiguous slice of ``n`` rows; ``n`` must divide evenly (equal shards keep DDP's
        gradient average equal to the full-batch mean)."""
        if n % self.world_size:
            raise ValueError(f"{what} of {n} cannot be split evenly over {self.world_size} processes; make it a "
                             f"multiple of the number of processes")
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)

    def split(self, n: int) -> slice:
        """This rank's contiguous slice of ``n`` rows when ``n`` need not divide evenly (a minibatch of online-DPO
        pairs): the first ``n % world_size`` ranks take one row more, a rank may get none. ``shard(n)`` when it
        divides. A loss over such shards must weigh each rank by its share (``methods.onpolicy`` does)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + int(self.rank < extra))

    # ------------------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (a new tensor; ``t`` itself when single-process)."""
        if not self.distributed:
            return t
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t

    def collective_device(self) -> torch.device:
        """Where tensors for collectives must live: the current GPU under a NCCL-only group, else the CPU."""
        backend = str(tdist.get_backend()) if self.distributed else "gloo"
        if "nccl" in backend and "cpu:" not in backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (e.g. a stop request or an error seen by one
        process), so that all ranks take the same branch."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], device=self.collective_device())
        return bool(self.all_reduce_max(t).item())

    def gather_rows(self, t: torch.Tensor, pad_value: float | int = 0) -> torch.Tensor:
        """Concatenate every rank's ``t`` [n_r, ...] along dim 0 in rank order. Dim 1 (if any) may differ across
        ranks: shorter rows are right-padded with ``pad_value`` to the longest (as one collate of the whole
        batch would have padded them)."""
        if not self.distributed:
            return t
        n = torch.tensor([t.shape[0], t.shape[1] if t.dim() > 1 else 0], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        tdist.all_gather(sizes, n)
        rows = [int(s[0]) for s in sizes]
        width = max(int(s[1]) for s in sizes)
        if t.dim() > 1 and t.shape[1] < width:
            pad = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), pad_value)
            t = torch.cat([t, pad], dim=1)
        mx = max(rows)
        if t.shape[0] < mx:  # all_gather needs equal shapes
            t = torch.cat([t, t.new_full((mx - t.shape[0], *t.shape[1:]), pad_value)])
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(parts, t.contiguous())
        return torch.cat([p[:r] for p, r in zip(parts, rows, strict=True)])

    def gather_objects(self, items: list) -> list:
        """Concatenate every rank's python list in rank order (pickled; for small metadata)."""
        if not self.distributed:
            return items
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of rank ``src`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_params(self, params: list[torch.Tensor], src: int = 0) -> None:
        """Copy rank ``src``'s parameter values to every rank (replicas start equal, as DDP does)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in params:
                tdist.broadcast(p.data, src=src)

    def all_reduce_grads(self, params: list[torch.Tensor], *, average: bool) -> None:
        """Sum (or average) the gradients of ``params`` over ranks, in flat buckets of ~16M elements. A missing
        gradient counts as zero (it is created, so every rank sends the same buckets)."""
        if not self.distributed:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket: list[torch.Tensor] = []
        size = 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel()
            if size >= 16_000_000 or i == len(grads) - 1:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
                if average:
                    flat /= self.world_size
                off = 0
                for b in bucket:
                    b.copy_(flat[off : off + b.numel()].view_as(b))
                    off += b.numel()
                bucket, size = [], 0
