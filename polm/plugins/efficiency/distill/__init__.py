"""Knowledge distillation: a student trained towards a teacher's next-token distributions.

``stage`` is the ``distill`` stage, ``student`` builds its student from the teacher, and ``losses`` holds
the objectives of the distillation family (:mod:`polm.engine.objectives`): ``forward_kl`` (Hinton et
al.), ``reverse_kl`` and GKD's generalised Jensen-Shannon divergence ``jsd``.
"""

from polm.plugins.efficiency.distill.losses import forward_kl, jsd, kl_divergence, reverse_kl
from polm.plugins.efficiency.distill.stage import DistillOptions, DistillStage, distill_loss
from polm.plugins.efficiency.distill.student import build_student, initialise_from_teacher, layer_map

__all__ = ["DistillOptions", "DistillStage", "build_student", "distill_loss", "forward_kl", "initialise_from_teacher",
           "jsd", "kl_divergence", "layer_map", "reverse_kl"]
