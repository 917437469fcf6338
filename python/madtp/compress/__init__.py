"""The MADTP++ compression pipeline: HWP (N:M weight pruning learned with SR-STE), knowledge distillation from
the dense model, and the cooperative GFLOPs budget between token pruning and weight pruning.

    teacher = make_teacher(model)                      # the dense model, frozen
    madtp.apply(model, config); prepare_sparse_training(model)
    table = measure_sensitivity(model, calib, grid, loss_fn)
    temps = split_budget(table, 0.5)                   # 2:4 Linear counted at half
    controller = TemperatureController.from_table(model, table, temps)   # a Trainer callback
    ... train with distillation_loss(...) ...
    export_sparse(model)                               # 2:4 layers -> madtp_kernels.SparseLinear
"""
from .budget import (
                     CostModel,
                     SensitivityEntry,
                     SensitivityTable,
                     TemperatureController,
                     measure_sensitivity,
                     split_budget,
)
from .distill import (
                     TeacherOutput,
                     distillation_loss,
                     kd_loss,
                     logits_of,
                     make_teacher,
                     teacher_forward,
                     teacher_summaries,
)
from .hwp import NMSparsity, export_sparse, nm_mask, one_shot, prepare_sparse_training, sparsity_report

__all__ = ["CostModel", "NMSparsity", "SensitivityEntry", "SensitivityTable", "TeacherOutput",
           "TemperatureController", "distillation_loss", "export_sparse", "kd_loss", "logits_of", "make_teacher",
           "measure_sensitivity", "nm_mask", "one_shot", "prepare_sparse_training", "sparsity_report",
           "split_budget", "teacher_forward", "teacher_summaries"]
