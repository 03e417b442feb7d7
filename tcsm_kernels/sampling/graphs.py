"""CUDA-graph capture of whole sampler loops, and the cache of captured loops.

A loop body ``body(x, frozen, seed) -> x or (x, trajectory)`` is captured once per cache key
(``skeleton.sample`` keys by sampler options, model, shape, device and trajectory) and then
replayed per call: one launch, no host sync, no allocation.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable

import torch

LoopBody = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]


class CapturedLoop:
    """A loop body captured in a CUDA graph on static buffers. A call copies x (B, L), frozen
    (B, L) and the seed (a device int64 that the Philox draws read at launch) into the buffers
    and replays the graph. The loop's host-side decisions (steps, offsets, the plan tables) are
    frozen at capture; they depend only on the options and the shape."""

    def __init__(self, body: LoopBody, x: torch.Tensor, frozen: torch.Tensor, warmup: int = 2):
        self.static_x = x.clone()
        self.static_frozen = frozen.clone()
        self.static_seed = torch.zeros((), dtype=torch.int64, device=x.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (kernel compiles, handles)
            for _ in range(warmup):
                body(self.static_x, self.static_frozen, self.static_seed)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = body(self.static_x, self.static_frozen, self.static_seed)

    def __call__(self, x: torch.Tensor, frozen: torch.Tensor, seed: int):
        self.static_x.copy_(x)
        self.static_frozen.copy_(frozen)
        self.static_seed.fill_(seed)
        self.graph.replay()
        if isinstance(self.static_out, tuple):  # (x, trajectory): copies outlive the next replay
            final, trajectory = self.static_out
            return final.clone(), [state.clone() for state in trajectory]
        return self.static_out.clone()


_GRAPHS: Dict[Hashable, CapturedLoop] = {}


def clear_graph_cache() -> None:
    """Drop every sampler loop captured by ``cuda_graph=True`` (and the model references and
    graph memory they hold)."""
    _GRAPHS.clear()


def replay(key: Hashable, prepare: Callable[[], LoopBody], x: torch.Tensor,
           frozen: torch.Tensor, seed: int):
    """Run the loop cached under ``key`` through its CUDA graph. On the key's first use,
    ``prepare()`` validates the call with one eager run and returns the loop body to capture."""
    if key not in _GRAPHS:
        _GRAPHS[key] = CapturedLoop(prepare(), x, frozen)
    return _GRAPHS[key](x, frozen, seed)
