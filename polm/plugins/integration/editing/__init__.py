"""Knowledge editing: facts written into a model's MLP weights in closed form, without training.

- :mod:`.rome`: ROME's rank-one update of one layer (arXiv 2202.05262), :func:`rome_update`;
- :mod:`.memit`: MEMIT's batched least-squares update over several layers (arXiv 2210.07229),
  :func:`memit_update`;
- :mod:`.values`: the target value both write, optimised so that the model completes the prompt with the target;
- :mod:`.tracing`: causal tracing, which layer's MLP carries a fact (:func:`mlp_effects`);
- :mod:`.model`: the layers of a Llama-style model, the request's tokens, hooks and the keys' second moment;
- :mod:`.requests`: ``{prompt, subject, target}`` rows read and checked; :mod:`.scores`: efficacy, paraphrase
  and neighbourhood;
- :mod:`.api` (:func:`edit`, the Python API) and :mod:`.stage` (the ``edit`` stage).

Measured on polm-tiny taught ``polm:facts`` by 750 steps of continued pretraining (batch 32, lr 2e-3; it then
completes 96% of the facts), the 50 edits of the ``edits`` split, greedy scores (:mod:`.scores`), 100 value
steps, clamp 10, no prefixes; neighbourhood 0.976 before any edit:

==========================================  ========  ==========  =============
method                                      efficacy  paraphrase  neighbourhood
==========================================  ========  ==========  =============
ROME, layer 1, one request at a time        0.98      0.27        0.976
ROME, layer 1, all 50 one after another     0.76      0.27        0.916
MEMIT, layers 0-1, one batch, lambda 1      0.90      0.28        0.932
MEMIT, layers 0-1, one batch, lambda 100    0.86      0.25        0.956
fine-tuning every weight, 60 Adam steps     1.00      0.77        0.152
==========================================  ========  ==========  =============

Fine-tuning is Adam at lr 1e-3 on the 50 prompts with their new targets, all in one batch. Eight prefixes
(sentences about places never edited, weight decay 0.1) raise paraphrase to 0.49 for ROME (efficacy 0.90,
neighbourhood 0.968) and 0.47 for MEMIT (efficacy 0.84, neighbourhood 0.796; sixteen give ROME 0.50):
paraphrases stay below the issue's 60%. Layer 1 was the best of polm-tiny's four for ROME on the first 10 edits
(efficacy 0.8 / 0.9 / 0.8 / 0.0 at layers 0-3 after 250 steps of teaching; the last layer's MLP at the subject
cannot reach the answer's position).
"""

from polm.plugins.integration.editing.api import METHODS, EditResult, corpus_texts, edit
from polm.plugins.integration.editing.memit import memit_edit, memit_update
from polm.plugins.integration.editing.requests import EditRequest, load_requests, validate_request
from polm.plugins.integration.editing.rome import rome_edit, rome_update
from polm.plugins.integration.editing.scores import edit_scores, yields
from polm.plugins.integration.editing.stage import EditOptions, EditStage
from polm.plugins.integration.editing.tracing import mlp_effects, traced_layer
from polm.plugins.integration.editing.values import ValueOptions, optimise_delta

__all__ = ["METHODS", "EditOptions", "EditRequest", "EditResult", "EditStage", "ValueOptions", "corpus_texts",
           "edit", "edit_scores", "load_requests", "memit_edit", "memit_update", "mlp_effects", "optimise_delta",
           "rome_edit", "rome_update", "traced_layer", "validate_request", "yields"]
