"""The arguments of a pipeline call: the prompt list and the noise key."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def noise_key(seed) -> jax.Array:
    """The noise key from a `seed` int or diffusers' `generator` spelling: an int or a `jax.random` key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(seed)
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if isinstance(seed, jax.Array) and seed.shape == (2,) and seed.dtype == jnp.uint32:  # jax.random.PRNGKey
        return jax.random.wrap_key_data(seed)
    raise TypeError(f"a {type(seed).__name__} cannot seed the noise: pass seed=INT or generator=jax.random.key(INT) "
                    "(a torch.Generator has no JAX meaning)")


def prompt_list(prompt: str | Sequence[str], num_images_per_prompt: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt: give at least one prompt")
    return [p for p in prompts for _ in range(num_images_per_prompt)]
