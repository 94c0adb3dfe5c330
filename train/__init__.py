"""Activation harvesting, activation stores and sparse-autoencoder training (`jaxdit.train`).

    harvest.py   capture hook positions along denoising trajectories (FLUX, SD3, any `HarvestModel`)
    store.py     activation stores (manifest + atomic zarr chunks) and the resumable shuffled `BatchStream`
    sae.py       TopK / BatchTopK / JumpReLU / ReLU SAEs as pure functions: init, encode, decode, train_loss
    sparse.py    latent-sharded exact two-stage TopK and k-sparse gathers (inside `jax.shard_map`)
    trainer.py   optax training on a ("data", "fsdp", "tensor") mesh with orbax checkpoints and exact resume
    interop.py   jaxdit SAE directories, SAELens and sparsify export / import
    cli.py       `jaxdit sae {harvest,train,export,import}`

Steering code loads a trained SAE with `interop.load_sae(path) -> (config, params)` and calls
`sae.encode` / `sae.decode` / `sae.encode_dense` on model activations (units are handled inside).
"""
