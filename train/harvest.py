"""Harvesting token activations from a denoising trajectory into activation stores, one per position.

    model = flux_model(params, config, name="flux-dev", height=1024, width=1024, guidance=3.5)
    stores = harvest(model, conditioning, ["single.10.img.resid_post"], steps=[0, 14],
                     sigmas=sigmas, timesteps=timesteps, out="acts/")

The model is any `HarvestModel`: a per-sample latent shape and a pure function
`apply(latents, timestep, step, hooks, cond) -> (velocity, captures)` (captures as returned by a jaxdit
model's `forward` with `Hooks(capture=...)`). `flux_model` and `sd3_model` wrap the jaxdit transformers;
anything else (classifier-free guidance, Kontext context tokens) is another `apply`.

`conditioning` is a list of batches, or `Batches` that makes each batch when it is needed: a pytree of
arrays with a leading batch axis (for the wrappers here: {"encoder_hidden_states": [B, L, D],
"pooled_projections": [B, P]}, from whatever text encoders the caller runs). Batch i starts from
Gaussian noise drawn from (seed, i), runs Euler steps with the given schedule up to the last requested
step (all of them in one `lax.scan`), and at each requested step keeps the captured positions. Each
position's rows [steps * B * tokens, width] (ordered step, prompt, token; per-head sites flattened to
heads * head_dim) are appended to its store as one chunk recording the batch index, prompt range and
steps. Interrupted harvests resume: a batch already in a store is not appended again, and a rerun draws
the same noise.

Several processes (`jaxdit.distributed`) harvest into one set of stores: batch i belongs to process
i % process_count, which makes it (so encodes only its share of the prompts), runs it on its own
devices and writes its chunks; after each round of one batch per process, process 0 lists the round's
chunks in batch order in the manifests. The stores are the ones a single process writes, chunk for chunk.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdit import distributed, hooks as hk
from jaxdit.train.store import ActivationStore

Apply = Callable[[jax.Array, jax.Array, jax.Array, hk.Hooks, Any], tuple[jax.Array, dict[str, jax.Array]]]
NOT_TOKEN_SITES = ("attn_probs_txt_to_img",)


@dataclasses.dataclass(frozen=True)
class HarvestModel:
    name: str  # recorded in every store manifest
    latent_shape: tuple[int, ...]  # one sample's latents, e.g. (tokens, 64) for FLUX, (C, h, w) for SD3
    apply: Apply  # (latents [B, *latent_shape], timestep (scheduler units), step int32, hooks, cond)


def flux_model(params, config, *, name: str, height: int, width: int, guidance: float | None = 3.5,
               vae_factor: int = 8) -> HarvestModel:
    """A FLUX transformer generating height x width pixel images: 2 * `vae_factor` pixels per latent token
    (`vae_factor`: the pipeline's VAE downsampling, 8 for the released models)."""
    from jaxdit import flux

    patch = 2 * vae_factor
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width}: height and width must be multiples of {patch} "
                         f"(VAE factor {vae_factor} x 2x2 packing)")
    grid_h, grid_w = height // patch, width // patch
    img_ids = flux.image_ids(grid_h, grid_w)

    def apply(latents, timestep, step, hooks, cond):
        batch = latents.shape[0]
        context = cond["encoder_hidden_states"]
        g = jnp.full((batch,), guidance, jnp.float32) if config.guidance_embeds else None
        # the sampler's timesteps are sigma * 1000; the FLUX transformer takes sigma
        t = jnp.full((batch,), timestep / 1000, jnp.float32)
        return flux.forward(params, config, latents, context, cond["pooled_projections"], t, img_ids,
                            flux.text_ids(context.shape[1]), g, hooks=hooks)

    return HarvestModel(name, (grid_h * grid_w, config.in_channels), apply)


def sd3_model(params, config, *, name: str, height: int, width: int, vae_factor: int = 8) -> HarvestModel:
    """An SD3 / SD3.5 transformer generating height x width pixel images (`vae_factor` pixels per latent
    pixel: the pipeline's VAE downsampling, 8 for the released models)."""
    from jaxdit import sd3

    multiple = vae_factor * config.patch_size
    if height % multiple or width % multiple:
        raise ValueError(f"image size {height}x{width}: height and width must be multiples of {multiple} "
                         f"(VAE factor {vae_factor} x patch size {config.patch_size})")

    def apply(latents, timestep, step, hooks, cond):
        t = jnp.full((latents.shape[0],), timestep, jnp.float32)
        return sd3.forward(params, config, latents, cond["encoder_hidden_states"], cond["pooled_projections"], t,
                           hooks=hooks)

    return HarvestModel(name, (config.in_channels, height // vae_factor, width // vae_factor), apply)


@dataclasses.dataclass(frozen=True)
class Batches:
    """Conditioning batches made on demand: batch i is `make(start, stop)` for its prompt rows
    `bounds[i]` = [start, stop)."""

    bounds: tuple[tuple[int, int], ...]
    make: Callable[[int, int], Any]

    @classmethod
    def split(cls, total: int, batch_size: int, make: Callable[[int, int], Any]) -> "Batches":
        """`total` prompts in batches of `batch_size` (the last one shorter)."""
        return cls(tuple((a, min(a + batch_size, total)) for a in range(0, total, batch_size)), make)

    @classmethod
    def of(cls, batches: Iterable[Any]) -> "Batches":
        """Batches already made (a list of pytrees)."""
        batches = list(batches)
        sizes = [jax.tree.leaves(b)[0].shape[0] for b in batches]
        starts = np.cumsum([0] + sizes).tolist()
        by_start = dict(zip(starts, batches))
        return cls(tuple(zip(starts[:-1], starts[1:])), lambda start, stop: by_start[start])

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i: int) -> Any:
        return self.make(*self.bounds[i])


def process_batches(count: int) -> range:
    """The indices of the batches (of `count`) this process harvests."""
    return range(jax.process_index(), count, jax.process_count())


def _check_request(positions: Sequence[str], steps: Sequence[int], num_steps: int) -> tuple[int, ...]:
    if not positions:
        raise ValueError("no positions given")
    for name in positions:
        if hk.Position.parse(name).site in NOT_TOKEN_SITES:
            raise ValueError(f"position {name!r} is not a per-token activation (attention probabilities); "
                             "capture it with Hooks directly")
    steps = tuple(sorted(set(int(s) for s in steps)))
    if not steps or steps[0] < 0 or steps[-1] >= num_steps:
        raise ValueError(f"steps {list(steps)} must be step indices in [0, {num_steps})")
    return steps


def trajectory_captures(model: HarvestModel, positions: Sequence[str], steps: tuple[int, ...], sigmas, timesteps):
    """jit-able (noise [B, *latent_shape], cond) -> {position: [len(steps), B, ...]} captured at `steps`.

    Euler steps as `jaxdit.sampling.euler_sample` takes them, with the captures of the requested steps
    carried in slot buffers (one slot per requested step), stopping after the last requested step.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    timesteps = jnp.asarray(timesteps, jnp.float32)
    table = jnp.asarray(steps, jnp.int32)

    def run(noise, cond):
        hooks = hk.Hooks(capture=tuple(positions))
        shapes = jax.eval_shape(lambda: model.apply(noise, timesteps[0], jnp.int32(0), hooks, cond)[1])
        buffers = {k: jnp.zeros((len(steps), *v.shape), v.dtype) for k, v in shapes.items()}

        def body(carry, i):
            x, buffers = carry
            v, caps = model.apply(x, timesteps[i], i, hk.Hooks(capture=tuple(positions), step=i), cond)
            hit = table == i
            slot = jnp.argmax(hit)
            buffers = {k: buf.at[slot].set(jnp.where(jnp.any(hit), caps[k].astype(buf.dtype), buf[slot]))
                       for k, buf in buffers.items()}
            x = (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v.astype(jnp.float32)).astype(x.dtype)
            return (x, buffers), None

        (_, buffers), _ = jax.lax.scan(body, (noise, buffers), jnp.arange(steps[-1] + 1, dtype=jnp.int32))
        return buffers

    return run


def harvest(model: HarvestModel, conditioning: Batches | Iterable[Any], positions: Sequence[str],
            steps: Sequence[int], *, sigmas, timesteps, out: str | os.PathLike, seed: int = 0, dtype: str = "float32",
            prompts: Sequence[str] | None = None, progress: bool = True) -> dict[str, ActivationStore]:
    """Run every conditioning batch through the trajectory and append the captures to stores under `out`
    (one directory per position, named after it). `sigmas` [N+1] / `timesteps` [N] come from
    `jaxdit.sampling` (e.g. `flux_schedule`); `prompts`, if given, are the texts of the conditioning rows
    in order, recorded with each chunk. Positions may use `*` for every layer. With several processes,
    every process calls this with the same arguments (see the module notes)."""
    steps = _check_request(positions, steps, len(timesteps))
    batches = conditioning if isinstance(conditioning, Batches) else Batches.of(conditioning)
    run = jax.jit(trajectory_captures(model, positions, steps, sigmas, timesteps))
    me, count = jax.process_index(), jax.process_count()
    made = {}  # this process's first batch, made once for the store layout and for its run

    def batch(i: int):
        return made.pop(i) if i in made else batches[i]

    def noise(i: int, cond) -> jax.Array:
        size = jax.tree.leaves(cond)[0].shape[0]
        return jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (size, *model.latent_shape))

    widths = None
    if me < len(batches):
        made[me] = batches[me]
        shapes = jax.eval_shape(run, noise(me, made[me]), made[me])  # {position: [steps, B, tokens, width...]}
        widths = {name: int(np.prod(shape.shape[3:], dtype=np.int64)) for name, shape in sorted(shapes.items())}
    stores = _open_stores(Path(out), widths, model.name, steps, timesteps, dtype)
    for r in tqdm(range(-(-len(batches) // count)), desc="harvest", unit="batch" if count == 1 else "round",
                  disable=not progress or me != 0):
        i = r * count + me
        written = {}
        if i < len(batches):
            written = _harvest_batch(i, r * count, batch, noise, run, batches, stores, steps, prompts)
        for name, entries in _by_store(distributed.allgather_json(written)).items():
            if name in stores:  # (a process without batches holds no stores)
                prompt_count = sum(b - a for a, b in (e["prompt_range"] for e in entries))
                stores[name].commit(entries, prompt_count, write=me == 0)
    distributed.barrier("jaxdit-harvest-done")  # the manifests are complete when any process returns
    return stores


def _open_stores(out: Path, widths: dict[str, int] | None, model: str, steps, timesteps, dtype: str
                 ) -> dict[str, ActivationStore]:
    """The store of every captured position (`widths`: {position: row width}, None for a process without
    batches), created or reopened by process 0 (which also clears a crashed run's leftovers) and then
    opened by the others."""
    lead = jax.process_index() == 0
    stores = {}
    if lead and widths is not None:
        for name, width in widths.items():
            stores[name] = ActivationStore.create(out / name, d=width, dtype=dtype, model=model, position=name,
                                                  steps=list(steps), timesteps=[float(timesteps[s]) for s in steps],
                                                  exist_ok=True)
            stores[name].remove_leftovers()
    distributed.barrier("jaxdit-harvest-stores")  # nobody writes a chunk before the stores exist
    if not lead and widths is not None:
        stores = {name: ActivationStore.open(out / name) for name in widths}
    return stores


def _harvest_batch(i: int, first: int, batch, noise, run, batches: Batches, stores: dict[str, ActivationStore],
                   steps: tuple[int, ...], prompts) -> dict[str, dict[str, Any]]:
    """Run batch i (of the round starting at batch `first`) for the stores that lack it and write its
    chunks; returns {store: manifest entry} for `commit`."""
    done = {name: {c.get("batch") for c in store.chunks} for name, store in stores.items()}
    todo = [name for name in stores if i not in done[name]]
    if not todo:
        return {}
    cond = batch(i)
    captured = run(noise(i, cond), cond)
    start, stop = batches.bounds[i]
    record = {"batch": i, "prompt_range": [start, stop], "steps": list(steps), "layout": ["step", "prompt", "token"]}
    if prompts is not None:
        record["prompt_texts"] = list(prompts[start:stop])
    written = {}
    for name in todo:
        # chunks are named by their place in the manifest: after those listed, in batch order in the round
        place = len(stores[name].chunks) + sum(j not in done[name] for j in range(first, i))
        value = np.asarray(captured[name])  # [steps, B, tokens, width...]
        written[name] = stores[name].write_chunk(value.reshape(-1, stores[name].d), f"{place:06d}",
                                                 {**record, "tokens": int(value.shape[2])})
    return written


def _by_store(gathered: list[dict[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Every process's {store: entry} of one round -> {store: entries in batch order}."""
    entries: dict[str, list[dict[str, Any]]] = {}
    for written in gathered:
        for name, entry in written.items():
            entries.setdefault(name, []).append(entry)
    return {name: sorted(e, key=lambda entry: entry["batch"]) for name, e in entries.items()}
