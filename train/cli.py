"""`jaxdit sae ...` subcommands; `register(subparsers)` adds them to the `jaxdit` parser.

    jaxdit sae train --data STORE_OR_NPY --out DIR --steps N [--arch topk] [--k 64] [--expansion 16]
                     [--batch-size 4096] [--lr LR] [--mesh data,fsdp,tensor] [--resume] ...
    jaxdit sae export --format saelens|sparsify SAE_DIR OUT
    jaxdit sae import --format saelens|sparsify SRC OUT
    jaxdit sae harvest --model PIPELINE_DIR --prompts FILE --positions POS... --steps S... --out DIR
    jaxdit sae harvest --model CKPT --conditioning EMB.safetensors --positions POS... --steps S... --out DIR

`train` and `harvest` run on several processes (hosts) when given --coordinator HOST:PORT --num-processes N
--process-id I, or --distributed under SLURM, Open MPI or on a Cloud TPU pod (`jaxdit.distributed`):
every process runs the same command line except for its --process-id.

Bad input raises ValueError / FileNotFoundError / FileExistsError with one line naming the problem; the
`jaxdit` main turns those into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxdit import distributed
from jaxdit.flags import (finite_float, fraction, fraction_below_one, non_negative_float, non_negative_int,
                        positive_float, positive_int, read_text, seed_int)


def _mesh(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(s < 1 and s != -1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected three device counts data,fsdp,tensor (e.g. 2,1,4; -1: the "
                                         f"rest), got {text!r}")
    return sizes


def _across_processes(command):
    """`command(args)` after joining the processes the flags name (before any other work, so that a bad
    flag is refused at once and JAX is first used after `jax.distributed.initialize`). A collective
    that fails mid-run (another process died) becomes one line naming this process."""
    def run(args) -> int:
        distributed.initialize(args)
        import jax

        try:
            return command(args)
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() == 1:
                raise
            raise distributed.DistributedError(f"{distributed.describe()} stopped: {distributed.first_line(e)} "
                                               "(has another process failed? see its output)") from None

    return run


def _lead() -> bool:
    """Whether this is the process that reports (process 0)."""
    import jax

    return jax.process_index() == 0


def _train(args) -> int:
    from jaxdit.convert.checkpoint import check_writable
    from jaxdit.train import sae, trainer
    from jaxdit.train.store import ActivationStore, open_source

    out = check_writable(args.out, "--out")
    if not args.resume and ((out / trainer.RECORD).exists() or (out / "checkpoints").exists()):
        raise FileExistsError(f"--out {out} already holds a training run; add --resume to continue it")
    source = open_source(args.data)
    manifest = source.manifest if isinstance(source, ActivationStore) else {}
    n = args.latents if args.latents is not None else args.expansion * source.d
    cfg = sae.SAEConfig(d_in=source.d, n_latents=n, arch=args.arch, k=args.k, compute_dtype=args.compute_dtype,
                        position=args.position or manifest.get("position"), model=args.model or manifest.get("model"))
    loss = sae.LossConfig(aux_k=args.aux_k, aux_alpha=args.aux_alpha, dead_tokens=args.dead_tokens,
                          sparsity_coeff=args.sparsity_coeff)
    tc = trainer.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                             decay=args.decay, decay_start=args.decay_start, b1=args.b1, loss=loss, seed=args.seed,
                             b_dec_init=args.b_dec_init, shuffle_window=args.shuffle_window,
                             data_streams=args.data_streams)
    opts = trainer.RunOptions(mesh=args.mesh, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                              progress=not args.no_progress)
    cfg, _ = trainer.train(args.data, args.out, cfg, tc, opts, resume=args.resume)
    if _lead():
        print(f"wrote {Path(args.out) / 'sae'} ({cfg.arch}, d_in={cfg.d_in}, n_latents={cfg.n_latents}, "
              f"input_scale={cfg.input_scale:g})")
    return 0


def _export(args) -> int:
    from jaxdit.train.interop import export_sae

    print(f"wrote {export_sae(args.sae_dir, args.out, args.format, overwrite=args.overwrite)}")
    return 0


def _import(args) -> int:
    from jaxdit.train.interop import import_sae

    print(f"wrote {import_sae(args.src, args.out, args.format, overwrite=args.overwrite)}")
    return 0


def _local_mesh():
    """A mesh of this process's first device when there are several processes (None: the default device):
    each process of a harvest holds the whole model and runs its own batches."""
    import jax

    from jaxdit.sharding import make_mesh

    return make_mesh(1, 1, 1, devices=jax.local_devices()[:1]) if jax.process_count() > 1 else None


def _read_prompts(path) -> list[str]:
    """A JSON list of prompts, or a text file with one prompt per line."""
    text = read_text(path, "--prompts")
    if str(path).endswith(".json"):
        try:
            prompts = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--prompts {path}: not valid JSON ({e})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"--prompts {path}: expected a JSON list of prompt strings")
        return prompts
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pipeline_conditioning(args):
    """(model, schedule, batches, prompts) from a pipeline folder: prompts encoded by its own encoders."""
    import jax.numpy as jnp

    from jaxdit import sampling
    from jaxdit.pipeline import SD3Pipeline, load_pipeline
    from jaxdit.train import harvest as hv

    if not args.prompts:
        raise ValueError("--prompts FILE is required with a pipeline folder (one prompt per line)")
    prompts = _read_prompts(args.prompts)
    if not prompts:
        raise ValueError(f"--prompts {args.prompts}: no prompts")
    pipe = load_pipeline(args.model)
    name = args.model_name or Path(args.model).name
    if isinstance(pipe, SD3Pipeline):
        model = hv.sd3_model(pipe.transformer_params, pipe.transformer_config, name=name, height=args.height,
                             width=args.width, vae_factor=pipe.vae_scale_factor)
        sigmas, timesteps = sampling.flow_match_schedule(pipe.scheduler, args.num_steps)
        encode = lambda batch: pipe.encode_prompt(batch)  # noqa: E731
    else:
        model = hv.flux_model(pipe.transformer_params, pipe.transformer_config, name=name, height=args.height,
                              width=args.width, guidance=args.guidance, vae_factor=pipe.vae_scale_factor)
        sigmas, timesteps = sampling.flux_schedule(pipe.scheduler, args.num_steps, model.latent_shape[0])
        encode = lambda batch: pipe.encode_prompt(batch, pipe.default_max_sequence_length)  # noqa: E731

    def make(start: int, stop: int):  # only for this process's batches: its share of the prompts
        embeds, pooled = encode(prompts[start:stop])
        return {"encoder_hidden_states": jnp.asarray(embeds, jnp.float32),
                "pooled_projections": jnp.asarray(pooled, jnp.float32)}

    return model, (sigmas, timesteps), hv.Batches.split(len(prompts), args.batch_size, make), prompts


def _file_conditioning(args):
    """(model, schedule, batches, prompts) from a checkpoint and precomputed prompt embeddings."""
    import jax.numpy as jnp

    from jaxdit import load_transformer, sampling
    from jaxdit.train import harvest as hv
    from jaxdit.train.interop import read_safetensors

    emb = read_safetensors(Path(args.conditioning))
    missing = {"encoder_hidden_states", "pooled_projections"} - set(emb)
    if missing:
        raise ValueError(f"{args.conditioning}: missing tensors {sorted(missing)} (found {sorted(emb)})")
    total = emb["encoder_hidden_states"].shape[0]
    if emb["pooled_projections"].shape[0] != total:
        raise ValueError(f"{args.conditioning}: encoder_hidden_states has {total} rows but pooled_projections "
                         f"has {emb['pooled_projections'].shape[0]}")
    prompts = _read_prompts(args.prompts) if args.prompts else None
    if prompts is not None and len(prompts) != total:
        raise ValueError(f"--prompts {args.prompts}: {len(prompts)} prompts for {total} conditioning rows")
    config, params = load_transformer(args.model, mesh=_local_mesh())
    name = args.model_name or Path(args.model).name
    if config.family == "flux":
        model = hv.flux_model(params, config, name=name, height=args.height, width=args.width, guidance=args.guidance)
        scheduler = sampling.FLUX_DEV_SCHEDULER if config.guidance_embeds else sampling.FLUX_SCHNELL_SCHEDULER
        schedule = sampling.flux_schedule(scheduler, args.num_steps, model.latent_shape[0])
    else:
        model = hv.sd3_model(params, config, name=name, height=args.height, width=args.width)
        schedule = sampling.flow_match_schedule(sampling.SD3_SCHEDULER, args.num_steps)
    batches = hv.Batches.split(total, args.batch_size, lambda start, stop: {
        k: jnp.asarray(emb[k][start:stop]) for k in ("encoder_hidden_states", "pooled_projections")})
    return model, schedule, batches, prompts


def _harvest(args) -> int:
    from jaxdit.convert.checkpoint import check_writable
    from jaxdit.train import harvest as hv

    check_writable(args.out, "--out")
    if max(args.steps) >= args.num_steps:
        raise ValueError(f"--steps {max(args.steps)}: step indices must be below --num-steps {args.num_steps}")
    if (Path(args.model) / "model_index.json").is_file():
        if args.conditioning:
            raise ValueError("--conditioning is for checkpoints; a pipeline folder encodes --prompts itself")
        model, (sigmas, timesteps), batches, prompts = _pipeline_conditioning(args)
    else:
        if not args.conditioning:
            raise ValueError(f"{args.model}: not a pipeline folder, so --conditioning EMB.safetensors is required")
        model, (sigmas, timesteps), batches, prompts = _file_conditioning(args)
    stores = hv.harvest(model, batches, args.positions, args.steps, sigmas=sigmas, timesteps=timesteps, out=args.out,
                        seed=args.seed, dtype=args.dtype, prompts=prompts)
    import jax

    if jax.process_count() > 1:
        mine = hv.process_batches(len(batches))
        print(f"{distributed.describe()}: batches {', '.join(map(str, mine)) or 'none'} (prompt rows "
              f"{', '.join(f'{a}..{b}' for a, b in (batches.bounds[i] for i in mine)) or 'none'})")
    if _lead():
        for position, store in stores.items():
            print(f"{store.path}: {store.count} rows of width {store.d} ({position})")
    return 0


def _add_distributed_options(parser) -> None:
    g = parser.add_argument_group("several processes (hosts)", "Every process runs the same command, each "
                                  "with its own --process-id; see docs/sae-at-scale.md.")
    g.add_argument("--coordinator", type=distributed.coordinator_address, metavar="HOST:PORT",
                   help="address of process 0, which listens on PORT (default: the environment's)")
    g.add_argument("--num-processes", type=positive_int, help="number of processes (default: the environment's)")
    g.add_argument("--process-id", type=non_negative_int, help="this process's index, 0 .. N-1")
    g.add_argument("--distributed", action="store_true",
                   help="join the processes the environment describes (SLURM, Open MPI, Cloud TPU pod, "
                        "JAX_COORDINATOR_ADDRESS); implied by the flags above")
    g.add_argument("--heartbeat-timeout", type=positive_int, default=100, metavar="SECONDS",
                   help="a process silent this long counts as dead and the others stop with an error")
    g.add_argument("--init-timeout", type=positive_int, default=300, metavar="SECONDS",
                   help="how long to wait for every process to join")


def register(subparsers) -> None:
    """Add `sae {train,export,import,harvest}` to an argparse subparsers object."""
    from jaxdit.train.interop import FORMATS
    from jaxdit.train.sae import ARCHS, COMPUTE_DTYPES
    from jaxdit.train.store import DTYPES
    from jaxdit.train.trainer import B_DEC_INITS, DECAYS

    p = subparsers.add_parser("sae", help="sparse autoencoders: harvest activations, train, export, import")
    sub = p.add_subparsers(dest="sae_command", required=True)

    t = sub.add_parser("train", help="train an SAE on an activation store or a .npy [N, d] file",
                       description="Writes OUT/train.json, OUT/checkpoints/, OUT/metrics.jsonl and, at the end, "
                                   "the SAE in OUT/sae/. Rerun the same command with --resume to continue.")
    t.add_argument("--data", required=True, help="activation store directory or .npy file")
    t.add_argument("--out", required=True, help="training output directory")
    t.add_argument("--steps", type=positive_int, required=True)
    t.add_argument("--arch", choices=ARCHS, default="topk")
    t.add_argument("--k", type=positive_int, default=64, help="active latents per token (topk, batchtopk)")
    width = t.add_mutually_exclusive_group()
    width.add_argument("--expansion", type=positive_int, default=16, help="latents = expansion * d (default 16)")
    width.add_argument("--latents", type=positive_int, help="number of latents")
    t.add_argument("--batch-size", type=positive_int, default=4096, help="tokens per step (global)")
    t.add_argument("--lr", type=positive_float, help="peak learning rate (default 2e-4 / sqrt(latents / 2^14))")
    t.add_argument("--warmup", type=non_negative_int, default=1000, help="warm-up steps")
    t.add_argument("--decay", choices=DECAYS, default="linear")
    t.add_argument("--decay-start", type=fraction, default=0.8, help="fraction of the steps where decay begins")
    t.add_argument("--b1", type=fraction_below_one, default=0.9, help="Adam beta1 (0 is usual for jumprelu)")
    t.add_argument("--aux-alpha", type=non_negative_float, default=1 / 32, help="AuxK coefficient (0: off)")
    t.add_argument("--aux-k", type=positive_int, default=256)
    t.add_argument("--dead-tokens", type=positive_int, default=10_000_000,
                   help="tokens without firing before a latent is dead")
    t.add_argument("--sparsity-coeff", type=non_negative_float, default=0.0,
                   help="L0 (jumprelu) / L1 (relu) coefficient")
    t.add_argument("--b-dec-init", choices=B_DEC_INITS, default="geometric_median")
    t.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="float32",
                   help="matmul operand dtype (float32 master weights either way)")
    t.add_argument("--mesh", type=_mesh, default=(-1, 1, 1), help="data,fsdp,tensor device counts (-1: the rest)")
    t.add_argument("--seed", type=seed_int, default=0)
    t.add_argument("--shuffle-window", type=positive_int, default=4, help="store chunks shuffled together")
    t.add_argument("--position", help="hook position recorded with the SAE (default: the store's)")
    t.add_argument("--model", help="model name recorded with the SAE (default: the store's)")
    t.add_argument("--log-every", type=positive_int, default=100)
    t.add_argument("--checkpoint-every", type=positive_int, default=1000)
    t.add_argument("--resume", action="store_true", help="continue the run in OUT from its newest checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--data-streams", type=positive_int,
                   help="the batch is this many slices, each from its own share of the data chunks; the same "
                        "number gives the same batches on any number of processes (default: the number of "
                        "processes; with --resume, the run's)")
    _add_distributed_options(t)
    t.set_defaults(fn=_across_processes(_train))

    e = sub.add_parser("export", help="convert a jaxdit SAE to the SAELens or sparsify layout")
    e.add_argument("--format", choices=FORMATS, required=True)
    e.add_argument("sae_dir", help="jaxdit SAE directory, or a training output directory (OUT of sae train)")
    e.add_argument("out")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.set_defaults(fn=_export)

    i = sub.add_parser("import", help="convert an SAELens or sparsify SAE to a jaxdit SAE directory")
    i.add_argument("--format", choices=FORMATS, required=True)
    i.add_argument("src", help="SAELens (cfg.json + sae_weights.safetensors) or sparsify (cfg.json + sae.safetensors)")
    i.add_argument("out")
    i.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    i.set_defaults(fn=_import)

    h = sub.add_parser("harvest", help="capture activations along denoising trajectories into activation stores",
                       description="MODEL is a pipeline folder (model_index.json: --prompts are encoded by its own "
                                   "text encoders) or a transformer checkpoint with --conditioning, a safetensors "
                                   "file with encoder_hidden_states [P, L, D] and pooled_projections [P, Dp].")
    h.add_argument("--model", required=True,
                   help="pipeline folder, or jaxdit checkpoint / diffusers transformer folder / original file")
    h.add_argument("--conditioning", help="prompt embeddings for a bare transformer checkpoint")
    h.add_argument("--prompts", help="prompts: one per line, or a JSON list (recorded in the stores)")
    h.add_argument("--positions", nargs="+", required=True, help="hook positions, e.g. single.10.img.resid_post")
    h.add_argument("--steps", nargs="+", type=non_negative_int, required=True, help="sampling step indices to capture")
    h.add_argument("--num-steps", type=positive_int, default=28, help="steps of the schedule")
    h.add_argument("--height", type=positive_int, default=1024)
    h.add_argument("--width", type=positive_int, default=1024)
    h.add_argument("--guidance", type=finite_float, default=3.5, help="FLUX guidance embedding (dev)")
    h.add_argument("--batch-size", type=positive_int, default=4)
    h.add_argument("--seed", type=seed_int, default=0)
    h.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="store dtype")
    h.add_argument("--model-name", help="recorded in the stores (default: the model path's name)")
    h.add_argument("--out", required=True, help="directory receiving one store per position")
    _add_distributed_options(h)
    h.set_defaults(fn=_across_processes(_harvest))
