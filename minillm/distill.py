"""Knowledge distillation: a small student learns from a big teacher's whole next-token distribution.

With the labels y alone, a student learns from one token per position. The teacher's softened
distribution says much more (which wrong tokens are nearly right), so the loss mixes both
(Hinton et al., 2015):

    loss = (1 - a) · CE(student logits, y)  +  a · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

T > 1 flattens both distributions so the teacher's small probabilities carry signal; the T² keeps
the soft term's gradient on the same scale as the hard term's whatever T is (the gradient of the
tempered KL shrinks like 1/T²). KL is summed over the vocabulary and averaged over positions, like CE.

Teacher and student must use the same tokenizer: position by position they predict over the same
ids, which is only meaningful if id 1234 is the same string for both (the trainer checks it with
`minillm.tokenizer.check_same_tokenizer`, the project's one rule for two models sharing ids).

`DistillLoss` is the loss object the trainer's loop is given in place of plain cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checkpoint import keep_blocks
from .model import Transformer


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl) for logits (B, T, V) and targets (B, T); see the module docstring.
    kl is the tempered KL(teacher ‖ student) per position, before the T² and alpha weights."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (same vocabulary needed)")
    s = student_logits.float().flatten(0, 1)  # (B*T, V)
    t = teacher_logits.float().flatten(0, 1)
    ce = F.cross_entropy(s, targets.flatten())
    log_q = F.log_softmax(s / temperature, dim=-1)  # student, tempered
    log_p = F.log_softmax(t / temperature, dim=-1)  # teacher, tempered
    # KL(p ‖ q) = Σ_v p_v (log p_v − log q_v); kl_div takes (log q, log p) with log_target=True
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)  # sum over V, mean over B*T
    loss = (1.0 - alpha) * ce + alpha * temperature**2 * kl
    return loss, ce, kl


@dataclass
class DistillLoss:
    """The trainer's loss with a teacher: `loss(model, x, y)` runs the student and the (frozen) teacher
    on the same batch and mixes labels and soft targets as `distill_loss` says."""
    teacher: Transformer
    temperature: float  # T
    alpha: float  # weight of the teacher's soft targets

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)  # (B, T, V)
        with torch.no_grad():
            teacher_logits = self.teacher(x)  # (B, T, V)
        return distill_loss(logits, teacher_logits, y, self.temperature, self.alpha)[0]


def truncated_copy(teacher: Transformer, n_layer: int) -> Transformer:
    """A student that starts as the teacher's first n_layer blocks, with the teacher's embeddings,
    final norm and output head: the teacher's shape except for the depth, and an independent copy."""
    if not 1 <= n_layer <= teacher.config.n_layer:
        raise ValueError(f"a student can keep between 1 and the teacher's {teacher.config.n_layer} layers, got {n_layer}")
    return keep_blocks(teacher, list(range(n_layer))).train()
