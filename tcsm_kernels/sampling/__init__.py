"""Sampler loops built on the fused CTMC step (docs/math.md 1, 7).

Any denoiser ``model(x_t, t) -> logits`` works: x_t (B, L) int64 token ids, t (B,) float32 in
[0, 1] (t = 1 is clean data, math.md 1), logits (B, L, V). Every step is one model call and one
call of ``tcsm_kernels.ops.ctmc_step.ctmc_step`` keyed by (seed, offset = step index), so a run
is reproducible by its seed.

Masked samplers plan first, then step. Which positions change in which step depends only on the
seed, the schedule and the initial mask, never on the model (the jump decision of the masked
path ignores the logits; confidence unmasking fixes how many tokens each step reveals). So the
plan is drawn on the device before the loop: for method "exact"/"euler" each position's
unmasking step (inverse CDF of its first-jump time under the schedule's per-step jump
probabilities, Philox uniforms keyed by (seed, ``plans.PLAN_OFFSET``, position)); for
"confidence" the number of tokens each sequence reveals per step. The step op then receives the
plan as a 0/1 per-position jump probability (or a count), which gives exactly the distribution
of per-step Bernoulli jumps. Caching uses the plan: a step that changes no token is skipped (no
model call, no step op); the skip list is read to the host once, before the loop, so the loop
itself never syncs, and the output equals ``cache=False`` bit for bit, for time-conditioned
models too (a skipped step could not have changed x; the model is always evaluated at the
current (x, t)).

With ``cuda_graph=True`` (CUDA) the whole loop is captured once in a CUDA graph and replayed:
every step runs, the seed is a device int64 read by the Philox draws at launch, and nothing in
the loop reads the device or allocates by value.

Modules, each importing only those below it:
  samplers  the samplers (``sample_masked``, ``sample_uniform``): options, tables, loops
  skeleton  ``StepLoop`` (the loop every sampler runs, adapters' solvers included),
            ``DenoiserLoop``, ``Sampler`` and ``sample`` (the shared public call)
  graphs    CUDA-graph capture and the cache of captured loops
  plans     unmasking plans and per-step jump tables, ``top_per_row``
"""
from . import graphs, plans, samplers, skeleton
from .graphs import clear_graph_cache
from .plans import top_per_row
from .samplers import *  # noqa: F401,F403 (the public samplers: samplers.__all__)
from .skeleton import Denoiser, SampleResult, progress_steps

__all__ = samplers.__all__ + ["clear_graph_cache", "top_per_row", "Denoiser", "SampleResult",
                              "progress_steps"]
