"""UVR anchor banks: per-head attention-output vectors of unsafe patches, collected offline.

The public reference saves the per-head attention output of single-stream block 10 on unsafe generations
but never turns it into anchors (`key_tensor = None  # need to compute`). jaxdit completes the step:

1. generate from prompts containing the concept (or edit given images with them, on Kontext), capturing at
   the localization position the per-head output of the generated patches and, at the same block, the
   text-to-image attention weights, over the start-up steps (timestep >= window; `timing="reference"`:
   the steps at which the reference saves, see `collection_steps`);
2. the unsafe patches of each image are those the concept's text tokens attend to most: the weights from
   the concept tokens, summed over heads, tokens and steps, above `quantile` of the image's patches
   (or a given per-patch mask, or a labeller applied after each run to its output and captures, e.g. a
   detector reading the generated image: `collect_vectors`);
3. per head, the selected vectors (over images and steps) are reduced to K anchors by k-means
   (deterministic k-means++-free init: evenly spaced samples), giving a bank [H, K, D].

`discriminant_anchors` is the alternative to step 3 that uses the other patches too: one anchor per head,
together Fisher's linear discriminant between the concept's patches and the rest, so the same score
(`localize.score_patches`, a mean of dot products: linear in the attention output) ranks patches by how far
they sit on the concept's side of the other objects rather than by their overlap with the concept's mean.

Banks are safetensors files (`anchors` [H, K, D] + JSON metadata: concept, model, position, steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxdit import hooks as hk


def kmeans(x: np.ndarray, k: int, iters: int = 20) -> np.ndarray:
    """K centroids of the rows of x [N, D] (N >= 1); init from evenly spaced rows, Lloyd iterations."""
    n = x.shape[0]
    k = min(k, n)
    centroids = x[np.linspace(0, n - 1, k).round().astype(int)].astype(np.float64)
    for _ in range(iters):
        d = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
        assign = d.argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centroids[j] = members.mean(0)
    return centroids.astype(np.float32)


def phrase_positions(tokens, phrases) -> np.ndarray:
    """Sorted indices of `tokens` covered by some occurrence of some phrase (each a token sequence)."""
    tokens = list(tokens)
    hits = set()
    for phrase in phrases:
        phrase = list(phrase)
        for i in range(len(tokens) - len(phrase) + 1):
            if phrase and tokens[i:i + len(phrase)] == phrase:
                hits.update(range(i, i + len(phrase)))
    return np.asarray(sorted(hits), np.int64)


def concept_token_positions(tokenizer, prompt: str, concept, max_length: int | None = None) -> np.ndarray:
    """Indices of the tokens of `prompt` that spell `concept` (a phrase, or a list of phrases of which any
    counts: synonyms).

    tokenizer: a Hugging Face tokenizer (the prompt padded to `max_length`, each phrase tokenized without
    special tokens), or a word-level tokenizer with `words(text)` and `max_length` such as the toy
    world's (words up to max_length - 1, the last slot being the end token; phrases split on spaces)."""
    phrases = [concept] if isinstance(concept, str) else list(concept)
    if hasattr(tokenizer, "words"):
        words = tokenizer.words(prompt)[: (max_length or tokenizer.max_length) - 1]
        return phrase_positions(words, [p.split() for p in phrases])
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    targets = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in phrases]
    if not all(targets):
        raise ValueError(f"concept {concept!r} tokenizes to nothing")
    return phrase_positions(ids, targets)


def patch_mask_from_attention(probs: np.ndarray, token_positions: np.ndarray, n_gen: int,
                              quantile: float = 0.8) -> np.ndarray:
    """probs [S, H, T_txt, T_img] (steps of one image) -> unsafe generated patches [n_gen] bool."""
    score = probs[:, :, token_positions, :n_gen].sum(axis=(0, 1, 2))
    return score > np.quantile(score, quantile)


def collection_steps(timesteps: np.ndarray, timing: str = "window", window_t: float = 850.0,
                     editing: bool = False) -> np.ndarray:
    """Indices of the sampling steps whose captures make the anchors.

    timing "window": the start-up window, timestep >= window_t (jaxdit). "reference": where the public
    reference saves its single-block-10 outputs: text-to-image at `timestep == 104` on the bfloat16
    timestep (no step at all with 28 steps at 1024^2, whose last timestep is 104.5 in bf16), editing at
    every step.
    """
    timesteps = np.asarray(timesteps, np.float32)
    if timing == "window":
        return np.flatnonzero(timesteps >= window_t)
    if timing == "reference":
        if editing:
            return np.arange(len(timesteps))
        from jaxdit.safety.uvr.regulate import reference_timestep

        return np.flatnonzero(np.asarray(reference_timestep(timesteps)) == 104.0)
    raise ValueError(f"anchor collection timing {timing!r}: expected 'window' or 'reference'")


def collect_vectors(run, chunks, labeller, position: str, window, n_gen: int, keep_all: bool = False):
    """Per-head vectors of the labelled generated patches over the `window` steps, labels found after
    each run.

    run(chunk) -> (outputs, kept): one sampling run of a chunk of inputs, with `kept[step][position]`
    [b, tokens, H, D] captured; labeller(chunk, outputs, kept) -> [b, n_gen] bool, applied after the run
    (to the outputs, e.g. a detector on the images, or to the captures, e.g. attention from the concept's
    tokens). Returns the vectors [N, H, D] (chunk, then step, then patch order); with `keep_all`, also every
    generated patch's vectors [M, H, D] and labels [M], e.g. to calibrate a threshold on them."""
    vectors, all_heads, all_labels = [], [], []
    for chunk in chunks:
        outputs, kept = run(chunk)
        labels = np.asarray(labeller(chunk, outputs, kept), bool)
        for s in window:
            heads = kept[s][position][:, :n_gen]  # [b, n_gen, H, D]
            vectors.append(heads[labels])
            if keep_all:
                all_heads.append(heads.reshape(-1, *heads.shape[2:]))
                all_labels.append(labels.reshape(-1))
    vectors = np.concatenate(vectors)
    return (vectors, np.concatenate(all_heads), np.concatenate(all_labels)) if keep_all else vectors


def anchors_from_vectors(vectors: np.ndarray, num_anchors: int) -> np.ndarray:
    """A bank [H, K, D]: per head, k-means of the vectors [N, H, D]."""
    return np.stack([kmeans(vectors[:, h], num_anchors) for h in range(vectors.shape[1])])


def discriminant_anchors(vectors: np.ndarray, labels: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """A bank [H, 1, D] from every patch's per-head vectors [N, H, D] and whether it shows the concept [N].

    w = (S + ridge * tr(S) / HD * I)^-1 (mu_concept - mu_rest), S the pooled within-class covariance of the
    flattened vectors (float64), scaled so that `localize.score_patches` gives the two class means scores
    one apart; the threshold is then chosen on the same patches, as for a k-means bank.
    """
    x = np.asarray(vectors, np.float64)
    y = np.asarray(labels, bool).reshape(-1)
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"discriminant_anchors: vectors {x.shape} and labels {y.shape}: expected [N, H, D] and [N]")
    if y.sum() < 2 or (~y).sum() < 2:
        raise ValueError(f"discriminant_anchors: {int(y.sum())} concept and {int((~y).sum())} other patches; "
                         "need at least 2 of each")
    n, h, d = x.shape
    flat = x.reshape(n, h * d)
    mu1, mu0 = flat[y].mean(0), flat[~y].mean(0)
    centred = np.concatenate([flat[y] - mu1, flat[~y] - mu0])
    cov = centred.T @ centred / n
    cov += ridge * np.trace(cov) / (h * d) * np.eye(h * d)
    w = np.linalg.solve(cov, mu1 - mu0)
    w *= h * np.sqrt(d) / (w @ (mu1 - mu0))  # score_patches divides by H sqrt(D)
    return w.reshape(h, 1, d).astype(np.float32)


def collect(pipe, prompts: list[str], concept: str, *, position: str = "single.10.img.attn_heads",
            height: int = 1024, width: int = 1024, num_inference_steps: int = 28, window_t: float = 850.0,
            seed: int = 0, quantile: float = 0.8, max_sequence_length: int | None = None,
            patch_masks: list[np.ndarray] | None = None, num_anchors: int = 16, progress: bool = True,
            timing: str = "window", images: list | None = None, labeller=None, output_type: str = "latent",
            **pipe_kwargs):
    """Anchor bank [H, K, D] for `concept` from FLUX generations of `prompts` (see module docstring).

    images: one source image per prompt for a Kontext pipeline (the prompts are then the edit
    instructions); `pipe_kwargs` go to each pipeline call. timing: see `collection_steps`.
    labeller(i, output, kept) -> [n_gen] bool: the unsafe patches of prompt i, found after its run from the
    pipeline's output (of `output_type`, e.g. "pil" for a detector) or the captures `kept[step][name]`
    (the localization position and the text-to-image weights); default: `patch_masks` if given, else
    the attention from the concept's tokens.
    """
    from jaxdit import sampling
    from jaxdit.pipeline import capture_run

    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    p = hk.Position.parse(position)
    probs_at = f"{p.stack}.{p.layer}.joint.attn_probs_txt_to_img"
    max_len = max_sequence_length or pipe.default_max_sequence_length
    grid = pipe._token_grid(height, width)
    n_gen = grid[0] * grid[1]
    _, timesteps = sampling.flux_schedule(pipe.scheduler, num_inference_steps, n_gen)
    window = collection_steps(timesteps, timing, window_t, editing=images is not None)
    if len(window) == 0:
        raise ValueError(f"no step has timestep >= {window_t}; lower window_t" if timing == "window" else
                         f"no step of the {num_inference_steps}-step schedule matches the reference's collection "
                         "timestep (104 in bfloat16)")
    def run(chunk):
        (i,) = chunk
        args = (prompts[i],) if images is None else (images[i], prompts[i])
        return capture_run(pipe, *args, capture=(position, probs_at), steps=window, height=height, width=width,
                           num_inference_steps=num_inference_steps, seed=seed + i, max_sequence_length=max_len,
                           output_type=output_type, progress=False, **pipe_kwargs)

    def label(chunk, outputs, kept):
        (i,) = chunk
        if labeller is not None:
            return np.asarray(labeller(i, outputs, kept), bool).reshape(1, -1)
        if patch_masks is not None:
            return np.asarray(patch_masks[i], bool).reshape(1, -1)
        tokens = concept_token_positions(pipe.tokenizer_2, prompts[i], concept, max_len)
        if len(tokens) == 0:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) does not contain the concept {concept!r}")
        probs = np.stack([kept[s][probs_at][0] for s in sorted(kept)])  # [S, H, T_txt, T_img]
        return patch_mask_from_attention(probs, tokens, n_gen, quantile)[None]

    vectors = collect_vectors(run, [[i] for i in range(len(prompts))], label, position, window, n_gen)
    if len(vectors) == 0:
        raise ValueError("no unsafe patch was selected; lower the quantile or give patch masks")
    anchors = anchors_from_vectors(vectors, num_anchors)
    meta = {"concept": concept, "position": position, "steps": [int(s) for s in window],
            "num_inference_steps": num_inference_steps, "height": height, "width": width,
            "prompts": list(prompts), "vectors": int(len(vectors)), "timing": timing, "editing": images is not None}
    return anchors, meta


def save_bank(path, anchors: np.ndarray, meta: dict) -> Path:
    """Write a bank atomically: safetensors with `anchors` [H, K, D] and JSON metadata."""
    from jaxdit.io import save_safetensors

    return save_safetensors(path, {"anchors": np.asarray(anchors, np.float32)},
                            {"jaxdit": json.dumps({"format": "uvr-anchors", "version": 1, **meta})})


def load_bank(path) -> tuple[np.ndarray, dict]:
    from jaxdit.convert.safetensors_io import CheckpointError, SafetensorsFile

    f = SafetensorsFile(path)
    if "anchors" not in f.keys() or "jaxdit" not in f.metadata:
        raise CheckpointError(f"{path}: not a UVR anchor bank (needs an 'anchors' tensor and jaxdit metadata)")
    anchors = np.asarray(f.get("anchors"), np.float32)
    if anchors.ndim != 3:
        raise CheckpointError(f"{path}: anchors must be [heads, K, head_dim], got {anchors.shape}")
    return anchors, json.loads(f.metadata["jaxdit"])
