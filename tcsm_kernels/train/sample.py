"""Text generation from a trained run with the library's samplers."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from ..schedules import get_schedule
from .data import Vocabulary
from .run import TrainedRun, mask_token

MASKED_METHODS = ("exact", "euler", "confidence")
METHODS = MASKED_METHODS + ("uniform",)


def prompt_ids(vocab: Vocabulary, prompt: str, length: int) -> Tuple[torch.Tensor, List[str]]:
    """The prompt's ids as the sampler fixes them (at most ``length``), and one sentence for
    each change made to it: the vocabulary's cleaning (text8: letters lower-cased, any other
    character a space, runs of spaces collapsed) and the cut to the sequence length."""
    ids = torch.as_tensor(vocab.encode(prompt))
    changes = []
    cleaned = vocab.decode(ids.tolist())
    if cleaned != prompt:
        changes.append(f"the prompt was cleaned to the run's {vocab.kind} vocabulary: "
                       f"{prompt!r} -> {cleaned!r}")
    if len(ids) > length:
        ids = ids[:length]
        changes.append(f"the prompt has {len(cleaned)} symbols, the run's sequences {length}: "
                       f"only the first {length} are kept ({vocab.decode(ids.tolist())!r})")
    return ids, changes


def generate(trained: TrainedRun, *, method: Optional[str] = None, steps: int = 32,
             num: int = 4, temperature: float = 1.0, seed: int = 0, prompt: str = "",
             report: Optional[Callable[[str], None]] = None,
             progress: bool = False) -> List[str]:
    """``num`` sequences of the run's length. Masked runs start all-mask (the prompt, if any,
    fixed at the start; ``report`` is told what was changed to fit it); uniform runs start from
    uniform noise. ``method``: exact, euler or confidence (masked runs; default exact) or
    uniform (uniform runs). ``progress``: the sampler's progress bar on stderr."""
    config, vocab = trained.config, trained.corpus.vocab
    allowed = MASKED_METHODS if config.masked else ("uniform",)
    method = method or allowed[0]
    if method not in allowed:
        raise ValueError(f"a {config.process} run samples with {', '.join(allowed)}; "
                         f"got {method!r}")
    if steps <= 0 or num <= 0:
        raise ValueError("steps and num must be > 0")
    schedule = get_schedule(config.schedule)
    device, length = trained.device, config.seq_len
    with torch.no_grad():
        if config.masked:
            from ..sampling import sample_masked
            mask = mask_token(config, trained.corpus)
            ids, changes = prompt_ids(vocab, prompt, length)
            for change in changes if report else ():
                report(change)
            x = torch.full((num, length), mask, dtype=torch.int64)
            x[:, :len(ids)] = ids  # positions that are not masked never change
            out = sample_masked(trained.model, x.to(device), steps=steps, mask_id=mask,
                                schedule=schedule, method=method, temperature=temperature,
                                seed=seed, progress=progress)
        else:
            from ..sampling import sample_uniform
            if prompt:
                raise ValueError("--prompt needs a masked run")
            generator = torch.Generator().manual_seed(seed)
            x = torch.randint(0, vocab.size, (num, length), generator=generator)
            out = sample_uniform(trained.model, x.to(device), steps=steps, schedule=schedule,
                                 temperature=temperature, seed=seed, progress=progress)
    return [vocab.decode(row.tolist()) for row in out.cpu()]
