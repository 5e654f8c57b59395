"""Knowledge distillation during recovery training: the dense model as a frozen teacher.

The student (the compressed model in its training form) learns from the labels and from the
teacher's softened output distribution (Hinton et al. 2015): ``(1 - alpha) * CE + alpha * T^2
* KL(teacher_T || student_T)``, and optionally (``hidden``) from the teacher's block outputs,
matched by mean squared error over the real (non-padding) tokens (as in TinyBERT's
hidden-state loss). Block outputs keep the model's width under head / FFN pruning and
factorization, so they are directly comparable; a student with fewer blocks is matched to the
teacher blocks it kept (``block_map``).

Every worker holds its own full teacher: it only runs forwards, under the same autocast as the
student, and is never wrapped by DDP or partitioned by ZeRO (ZeRO-3 included). With
``teacher_precision: bf16`` its weights are bfloat16 (``prepare_teacher``): on a CPU with native
bf16 instructions its forward takes about half the time of fp32's, which is a quarter of a
distilling step's time saved, at outputs within about 1 % of fp32's (benchmarks/BENCHMARKS.md,
"The teacher's precision"). Plain torch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config.schema import DistillConfig

TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def prepare_teacher(teacher: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """The teacher on ``device`` with its floating-point weights and buffers at ``precision``
    (``fp32`` or ``bf16``); integer buffers (position ids) keep their type."""
    return teacher.to(device=device, dtype=TEACHER_DTYPES[precision])


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively: on a CPU, oneDNN's check (AVX512-BF16
    or AMX); on a GPU, torch's (compute capability 8.0 and up). Other devices: assumed."""
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def emulated_bf16_note(precision: str, device: torch.device) -> str | None:
    """A line to log when a bf16 teacher runs on a device without native bf16 (its matmuls are
    then emulated through fp32, and the forward may be slower than fp32's), else None."""
    if precision != "bf16" or native_bf16(device):
        return None
    return (
        f"train.distill.teacher_precision=bf16: this {device.type} has no native bf16 "
        "(a CPU without AVX512-BF16 / AMX, a GPU older than compute capability 8.0), so the "
        "teacher's forward may be slower than in fp32; set teacher_precision=fp32 here"
    )


class Distiller:
    """The distillation loss for one student given its batch; the teacher's forward inside."""

    def __init__(
        self,
        teacher: nn.Module,
        cfg: DistillConfig,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        block_map: list[int] | None = None,
    ) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.autocast = autocast
        # Student hidden state i is compared with teacher hidden state block_map[i] (index 0:
        # the embeddings); None: one to one, or spread evenly over a deeper teacher.
        self.block_map = block_map

    @property
    def wants_hidden_states(self) -> bool:
        return self.cfg.hidden > 0

    def loss(self, student_out: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one micro-batch (``student_out``: the student's forward on
        ``batch``, with hidden states when ``wants_hidden_states``)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.wants_hidden_states:
            inputs["output_hidden_states"] = True
        with torch.no_grad(), self.autocast():
            teacher_out = self.teacher(**inputs)
        task = student_out.loss
        t = self.cfg.temperature
        student_logits = student_out.logits.float() / t
        teacher_logits = teacher_out.logits.float() / t
        if student_logits.dim() == 3:
            # A language model: one distribution per predicted position, averaged over them
            # (as its task loss is), not summed over a sequence.
            student_logits = student_logits[:, :-1].reshape(-1, student_logits.shape[-1])
            teacher_logits = teacher_logits[:, :-1].reshape(-1, teacher_logits.shape[-1])
        kd = F.kl_div(
            F.log_softmax(student_logits, -1),
            F.log_softmax(teacher_logits, -1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        loss = (1 - self.cfg.alpha) * task + self.cfg.alpha * kd
        if self.wants_hidden_states:
            loss = loss + self.cfg.hidden * self._hidden_loss(
                student_out.hidden_states, teacher_out.hidden_states, batch.get("attention_mask")
            )
        return loss

    def _pairs(self, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
        if self.block_map is not None:
            return list(enumerate(self.block_map))
        if n_student == n_teacher:
            return [(i, i) for i in range(n_student)]
        step = (n_teacher - 1) / max(1, n_student - 1)
        return [(i, round(i * step)) for i in range(n_student)]

    def _hidden_loss(
        self,
        student: tuple[torch.Tensor, ...],
        teacher: tuple[torch.Tensor, ...],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        total = student[0].new_zeros((), dtype=torch.float32)
        pairs = self._pairs(len(student), len(teacher))
        for i, j in pairs:
            diff = (student[i].float() - teacher[j].float()).pow(2).mean(-1)  # per token
            if mask is not None and diff.shape == mask.shape:
                m = mask.to(diff.dtype)
                total = total + (diff * m).sum() / m.sum().clamp_min(1.0)
            else:
                total = total + diff.mean()
        return total / max(1, len(pairs))
