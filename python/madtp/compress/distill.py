"""Knowledge distillation from the dense model into the compressed one (token + weight pruning).

    total = task + alpha * MAG alignment loss
          + beta_v * mean over layers MSE(student vision summary, teacher's)
          + beta_t * mean over layers MSE(student text summary, teacher's)
          + gamma * T^2 * KL(softmax(teacher logits / T) || softmax(student logits / T))

A layer's summary is its output state of each sample's summary token: the vision CLS, CLIP text's EOT (found as
CLIPTextModel finds it), BLIP text's CLS; the student's are recorded by the pruned forward
(`model.madtp.records[branch].summaries`), the teacher's read from its Hugging Face layer outputs (what
`output_hidden_states=True` returns as hidden_states[i + 1]). T^2 keeps the KD gradient's scale independent of T
(Hinton et al. 2015); it is applied once (the published MADTP code multiplies by T^2 twice).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..patch import ATTRIBUTE, MADTPState, Tower, find_towers
from ..patch import alignment_loss as _alignment_loss
from .hwp import TAG, _sparsity_of

__all__ = ["make_teacher", "teacher_forward", "teacher_summaries", "kd_loss", "logits_of", "distillation_loss",
           "TeacherOutput"]

BRANCHES = ("vision", "text")
# The logits the KD term compares, first present wins: CLIP/BLIP-ITC image-to-text similarities (one row per
# image over the batch's texts), BLIP's ITM head, a language/answer head.
LOGIT_FIELDS = ("logits_per_image", "itm_score", "logits")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the dense model: eval mode, no gradients, nothing shared with `model`.

    Made from a plain or a madtp-applied model (the copy then is the plain Hugging Face model without the MADTP
    patches, rebuilt from its config and weights: the patches hold closures over the original). Weight pruning
    must come after: a model with N:M layers is refused, since the teacher is the dense model."""
    model = _unwrap(model)
    for name, module in model.named_modules():
        if _sparsity_of(module) is not None or hasattr(module, TAG) or type(module).__name__ == "SparseLinear":
            raise ValueError(f"model: {name} is weight-pruned already; make the teacher from the dense model, "
                             "before prepare_sparse_training / one_shot / sparsify")
    if isinstance(getattr(model, ATTRIBUTE, None), MADTPState):
        teacher = _rebuild_without_madtp(model)
    else:
        teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _rebuild_without_madtp(model: nn.Module) -> nn.Module:
    param = next(model.parameters())
    teacher = type(model)(copy.deepcopy(model.config)).to(device=param.device, dtype=param.dtype)
    prefix = ATTRIBUTE + "."
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    teacher.load_state_dict(state, strict=True)
    with torch.no_grad():   # non-persistent buffers (position ids) too
        for name, buf in model.named_buffers():
            if not name.startswith(prefix):
                owner, _, leaf = name.rpartition(".")
                teacher.get_submodule(owner)._buffers[leaf] = buf.detach().clone()
    return teacher


# ------------------------------------------------------------------ teacher summaries

def _summary_index(tower: Tower, inputs: dict, batch: int, device) -> Tensor:
    """[B] position of each sample's summary token: the tower's protected token (CLIP text's EOT, found by the
    family's own input reader, as the pruned student finds it), else 0 (CLS)."""
    bound = {k: inputs[k] for k in ("input_ids", "attention_mask") if tower.spec.branch == "text" and k in inputs}
    protected = tower.spec.inputs(tower.module, bound).protected if bound else None
    if protected is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return protected.to(device).int().argmax(dim=1).long()


def _summaries(tower: Tower, hidden: list[Tensor], inputs: dict) -> list[Tensor]:
    batch = hidden[0].shape[0]
    index = _summary_index(tower, inputs, batch, hidden[0].device)
    rows = torch.arange(batch, device=index.device)
    return [h[rows, index] for h in hidden]


class TeacherOutput:
    """The teacher's model output and its per-layer summaries {branch: [B, C] per layer}."""

    def __init__(self, outputs, summaries: dict[str, list[Tensor]]):
        self.outputs, self.summaries = outputs, summaries

    def __getattr__(self, name):   # reads like the model output (logits_per_image, ...)
        if name in ("outputs", "summaries"):
            raise AttributeError(name)
        return getattr(self.outputs, name)


@torch.no_grad()
def teacher_forward(teacher: nn.Module, **inputs) -> TeacherOutput:
    """Run the teacher on `inputs` (no grad) and collect each tower layer's output summary.

    Reads the layer outputs through forward hooks: the tensors output_hidden_states returns as hidden_states[i+1],
    also where a model does not return them (BLIP's retrieval model drops its text encoder's hidden states)."""
    towers = find_towers(teacher)
    hidden: dict[int, list[Tensor]] = {id(t.module): [] for t in towers}
    handles = []
    for tower in towers:
        store = hidden[id(tower.module)]
        for layer in tower.layers:
            handles.append(layer.register_forward_hook(
                lambda module, args, out, store=store: store.append(out[0] if isinstance(out, tuple) else out)))
    try:
        outputs = teacher(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    summaries: dict[str, list[Tensor]] = {}
    for tower in towers:
        states = hidden[id(tower.module)]
        if len(states) == len(tower.layers):   # a tower the call did not run (or ran twice) has no summaries
            summaries[tower.spec.branch] = _summaries(tower, states, inputs)
    return TeacherOutput(outputs, summaries)


def _hidden_states(outputs, branch: str, towers: list[Tower]):
    sub = getattr(outputs, f"{branch}_model_output", None)   # CLIPModel: one output per tower
    if sub is not None:
        return getattr(sub, "hidden_states", None)
    # A one-tower model (CLIPVisionModel, CLIPTextModel), or BLIP retrieval, whose hidden_states are the image's.
    if len(towers) == 1 or branch == "vision":
        return getattr(outputs, "hidden_states", None)
    return None


def teacher_summaries(teacher: nn.Module, outputs, **inputs) -> dict[str, list[Tensor]]:
    """{branch: [B, C] per layer} from a teacher output computed with output_hidden_states=True:
    hidden_states[i + 1] at the summary token (vision CLS; CLIP text EOT; BLIP text CLS). Branches whose hidden
    states the output does not carry (BLIP retrieval's text) are left out: use `teacher_forward` for those."""
    out = {}
    towers = find_towers(teacher)
    for tower in towers:
        hs = _hidden_states(outputs, tower.spec.branch, towers)
        if hs is not None and len(hs) == len(tower.layers) + 1:
            out[tower.spec.branch] = _summaries(tower, list(hs[1:]), inputs)
    return out


# ------------------------------------------------------------------ the loss

def logits_of(output) -> Tensor:
    for name in LOGIT_FIELDS:
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise ValueError(f"output: no logits to distil; expected one of {LOGIT_FIELDS} on {type(output).__name__}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over the last dim, mean over rows."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    t = float(temperature)
    s = F.log_softmax(student_logits.float().reshape(-1, student_logits.shape[-1]) / t, dim=-1)
    p = F.log_softmax(teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]) / t, dim=-1)
    return t * t * F.kl_div(s, p, log_target=True, reduction="batchmean")


def _layer_mse(student: list[Tensor], teacher: list[Tensor], branch: str) -> Tensor:
    if len(student) != len(teacher):
        raise ValueError(f"{branch}: the student recorded {len(student)} layer summaries, the teacher "
                         f"{len(teacher)}; distillation pairs layer i with layer i")
    return torch.stack([F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student, teacher,
                                                                                  strict=True)]).mean()


def distillation_loss(student: nn.Module, teacher: nn.Module, student_out, teacher_out, *, alpha: float = 0.0,
                      beta_v: float = 0.0, beta_t: float = 0.0, gamma: float = 0.0, temperature_kd: float = 1.0,
                      task_loss: Tensor, inputs: dict | None = None,
                      summaries: dict[str, list[Tensor]] | None = None) -> dict[str, Tensor]:
    """The MADTP++ training objective (module docstring) after a student forward and a teacher forward.

    teacher_out: a TeacherOutput (`teacher_forward`), which carries the teacher summaries; else a plain model
    output, the teacher summaries then given as `summaries` or computed from its hidden states with `inputs`.
    Returns {"loss": total, "task", "alignment", "distill_vision", "distill_text", "kd"}: the Trainer's Task.loss
    format (a term whose weight is 0 is not computed and reads 0)."""
    model = _unwrap(student)
    state = getattr(model, ATTRIBUTE, None)
    if not isinstance(state, MADTPState):
        raise ValueError("student: madtp.apply(model, config) has not been called on this model")
    if not (isinstance(temperature_kd, (int, float)) and temperature_kd > 0):
        raise ValueError(f"temperature_kd: expected a number > 0, got {temperature_kd!r}")
    zero = task_loss.new_zeros(())
    parts = {"task": task_loss, "alignment": zero, "distill_vision": zero, "distill_text": zero, "kd": zero}
    if alpha:
        parts["alignment"] = _alignment_loss(model)
    if beta_v or beta_t:
        if summaries is None:
            summaries = teacher_out.summaries if isinstance(teacher_out, TeacherOutput) else \
                teacher_summaries(teacher, teacher_out, **(inputs or {}))
        for branch, beta in (("vision", beta_v), ("text", beta_t)):
            if not beta:
                continue
            record = state.records.get(branch)
            if record is None or not record.summaries:
                raise ValueError(f"student: the last forward did not run the {branch} branch (beta for it is "
                                 f"{beta})")
            if branch not in summaries:
                raise ValueError(f"teacher_out: no {branch} summaries (run the teacher with teacher_forward, or "
                                 "with output_hidden_states=True and pass inputs=)")
            parts[f"distill_{branch}"] = _layer_mse(record.summaries, summaries[branch], branch)
    if gamma:
        parts["kd"] = kd_loss(logits_of(student_out), logits_of(teacher_out), temperature_kd)
    total = parts["task"] + alpha * parts["alignment"] + beta_v * parts["distill_vision"] + \
        beta_t * parts["distill_text"] + gamma * parts["kd"]
    return {"loss": total, **parts}
