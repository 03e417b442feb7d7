"""Top-K teacher distributions for the loss tests (objective="distrib")."""
import torch


def topk_distribution(logits: torch.Tensor, k: int, mask_id, gen: torch.Generator):
    """(indices (N, k) distinct per row, log-probabilities (N, k) float32) of a teacher
    correlated with the student: even rows take the teacher's k best columns (the student's
    mass on S then often exceeds 1/2, the exact-rest path), odd rows random columns; every
    third row holds the mask column (an entry the loss drops)."""
    n, v = logits.shape
    k = min(k, v)
    teacher = logits.double() + torch.randn(n, v, generator=gen, dtype=torch.float64) * 1.5
    log_q = torch.log_softmax(teacher, dim=1)
    best = teacher.argsort(dim=1, descending=True)[:, :k]
    shuffled = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)]) if n else best
    idx = torch.where((torch.arange(n) % 2 == 0)[:, None], best, shuffled)
    if mask_id is not None and k >= 2:
        for row in range(1, n, 3):
            if not bool((idx[row] == mask_id).any()):
                idx[row, 1] = mask_id
    return idx, log_q.gather(1, idx).float()
