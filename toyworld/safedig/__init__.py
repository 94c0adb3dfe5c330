"""SafeDIG measured end to end on the toy world: a source forbidden concept, a different target one seen
through a few samples, decoder adaptation, Blend / Repel at inference, and the concept suites.

The formulas are those of `jaxdit.safety.safedig.core` (docs/safedig.md); this module only supplies the
toy world's data and the measurement around them. The pipeline, step by step:

1. Harvest (`harvest`). Token activations at candidate hook positions covering the three stages: the text
   stream entering and leaving the first double block, the image stream of the double blocks and of the
   single blocks (`CANDIDATES`). Activations come from one forward pass of the model per example and noise level on
   *rendered* scenes with their captions (and edits, with the source scene as Kontext context tokens),
   noised as training does, x_s = (1 - s) x0 + s n, at sigmas of the 12-step sampling schedule
   (`HARVEST_STEPS`). Why forward passes on rendered scenes rather than sampling trajectories: every
   label is then exact. An image token (a 4x4-pixel patch of the 8x8 token grid) is unsafe exactly when
   it overlaps the concept object's mask (`scenes.ground_truth`), which holds only if the image being
   denoised is the rendered one; on a sampled trajectory the object lands wherever the model puts it (or
   nowhere) and labels would have to come from the detector, mixing its errors into the dictionary. The
   noise levels are those the sampler visits, and a flow-matching model's input at step i is
   distributed as x_s at s = sigma_i, so the activations are those steering meets at inference.
   Labels: image tokens 2 = overlaps the concept object, 1 = overlaps another object, 0 = background;
   text tokens 2 = a word of the concept's name (any synonym), 1 = another word or the end token,
   0 = padding (the transformer attends to padding too, so it is harvested as safe).
   Domains: source = scenes with and without the source concept (t2i captions with random paraphrases and
   synonyms, and edits: adding it, edits keeping it, edits without it); target = a few scenes (default 24)
   with the target concept, each used as a t2i example and as the context of a neutral background edit;
   a paraphrase/seed shift = fresh source-concept scenes whose caption names the concept by a synonym
   where one exists, with other noise seeds. Source scenes are drawn from the whole world, so scenes
   without the source concept may hold the target shape: the dictionary's data is unlabelled for the
   target concept (as a real SAE's corpus holds every concept), and the only target labels are the few
   target samples (`source_excludes_target=True` removes the target concept from the source data).
2. Routing (`route_positions`): `core.route` over the candidates, source = source domain, shifts =
   target domain, the paraphrase/seed group, and the source domain at high and at low noise; the table
   also gives the stability under each shift alone.
3. Safety dictionary (`train_dictionary`) per routed position: a `jaxdit.safety.safedig.dictionary.Dictionary`,
   its TopK SAE trained with the project's trainer (`dictionary.train_sae`, `jaxdit.train.trainer.train_array`)
   on all source-domain tokens at that position; harmful latents by
   `core.harmful_latents` with unsafe = concept tokens and safe = tokens of other objects (other words)
   plus as many background (padding) tokens, so latents of "any object" are not chosen.
4. Decoder adaptation (`adapt_dictionary`): `core.adapt_decoder` on every token of the few target
   samples (encoder frozen, bit for bit). The target's harmful latents: the same contrast with the frozen
   encoder on the few target samples (heart tokens against the other tokens of those scenes), united
   with the source's, so the adapted dictionary forbids both concepts.
5. Steering (`method_hooks`): `dictionary.steering_hooks`, one `core.steering_edit` per routed position
   (Blend or Repel, gate and harmful latents per dictionary), merged into a `Hooks` value for `ToyWorld.generate` / `.edit`. Methods compared (`build_methods`):
   `source` (source dictionary, source latents, source decoder), `source+target_latents` (the target's
   latents added, decoder not adapted: what the harmful set alone gives), `adapted` (SafeDIG: adapted
   decoder, both latent sets), `retrained` (an SAE trained from scratch on the same few target samples,
   its own latents and decoder).
6. Measurement (`SuiteRunner`, `run`): the suites of both concepts (`suites.build_suites`) and a shared
   safe suite free of both concepts, without and with each method; per-suite tables and the three bars:
   target-domain unsafe-rate reduction (aggregate erase rate over the target's unsafe suites), source
   erase rate, and the detector-accuracy drop on the safe suite. Strength, gate, step window, harmful
   latent count and number of positions are chosen on a calibration split (`calibrate`): the same suite
   builders on another seed stream (`CALIBRATION_SEED`), never on the evaluation items.

    from jaxdit.toyworld import safedig
    result = safedig.run(safedig.Settings(source="star", target="heart"), n=32)

Modules: `examples` (examples and labels), `harvest`, `routing`, `dictionaries`, `steering`, `measurement`,
`calibration`, `experiment` (`prepare`, `run`), `report`; this package re-exports their public names.
"""

from jaxdit.toyworld.safedig.calibration import (CALIBRATION_SEED, METHODS, OPERATING_POINTS, build_methods,
                                                 calibrate, calibration_objective, default_grid, erase_objective)
from jaxdit.toyworld.safedig.dictionaries import (DictConfig, adapt_dictionary, contrast_sets, train_dictionary,
                                                  with_target_latents)
from jaxdit.toyworld.safedig.examples import (Example, image_token_labels, shift_examples, source_examples,
                                              target_examples, text_token_labels)
from jaxdit.toyworld.safedig.experiment import CALIBRATION_SAFE_FACTOR, Settings, prepare, run
from jaxdit.toyworld.safedig.harvest import CANDIDATES, HARVEST_STEPS, Harvest, harvest, stream_of
from jaxdit.toyworld.safedig.measurement import UNSAFE_SUITES, SuiteRunner, bars_met, measurement_items
from jaxdit.toyworld.safedig.report import format_report
from jaxdit.toyworld.safedig.routing import concept_auc, route_positions, routing_groups
from jaxdit.toyworld.safedig.steering import Steering, firing_rates, gate_value, harmful_peak, method_hooks

__all__ = ["CALIBRATION_SAFE_FACTOR", "CALIBRATION_SEED", "CANDIDATES", "HARVEST_STEPS", "METHODS",
           "OPERATING_POINTS", "UNSAFE_SUITES", "DictConfig", "Example", "Harvest", "Settings", "Steering",
           "SuiteRunner", "adapt_dictionary", "bars_met", "build_methods", "calibrate", "calibration_objective",
           "concept_auc", "contrast_sets", "default_grid", "erase_objective", "firing_rates", "format_report",
           "gate_value", "harmful_peak", "harvest", "image_token_labels", "measurement_items", "method_hooks",
           "prepare", "route_positions", "routing_groups", "run", "shift_examples", "source_examples",
           "stream_of", "target_examples", "text_token_labels", "train_dictionary", "with_target_latents"]
