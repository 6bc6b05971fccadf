"""Knowledge distillation: a student trained towards a teacher's next-token distributions.

``losses`` holds the objectives of the distillation family (:mod:`polm.engine.objectives`): ``forward_kl``
(Hinton et al.), ``reverse_kl`` and GKD's generalised Jensen-Shannon divergence ``jsd``.
"""

from polm.plugins.efficiency.distill.losses import forward_kl, jsd, kl_divergence, reverse_kl

__all__ = ["forward_kl", "jsd", "kl_divergence", "reverse_kl"]
