"""CPU kernels for the SAE training step, called through the XLA FFI (`cpu_kernels.cc`). XLA's CPU runtime
runs a TopK, a gather loop or a scatter on one thread; these split their rows over XLA's intra-op thread
pool (sparsify's torch kernels use every core the same way):

- `top_k`: `lax.top_k`, each row scanned in two vectorised passes instead of a partial sort (XLA's was
  half of a training step at d 48). Bit for bit `lax.top_k` (values, indices, tie order, signed zeros,
  NaNs), so which one ran never changes which latents are selected.
- `weighted_rows`, `row_products`, `scatter_rows`, `scatter_rows_dot`: the k-sparse products of
  `sparse.py` (k weight rows read or accumulated per token, the embedding-bag pattern). The scatter
  buckets its updates by row first, so each gradient row is summed once in cache, and writes the
  encoder's gradient transposed by tiles; `scatter_rows_dot` adds the decoder's row products to the pass.

Each is chosen per platform when a program is lowered (`lax.platform_dependent`): other backends run the
XLA version. Where the library cannot be built (no C++ compiler: one warning when CPU is the default
backend), or with `JAXDIT_CPU_KERNELS=0`, CPU runs it too: the same selection, sums equal within float
rounding, 2.2-3x slower SAE steps.

The library is compiled on first use with the system's C++ compiler against the FFI headers jaxlib ships,
into `$JAXDIT_CACHE_DIR` (default `~/.cache/jaxdit`; the temporary directory if that is not writable), under
a name that hashes the source, the compiler
command and jaxlib's version; written to a temporary name and renamed, so concurrent processes share it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# The handlers the library exports, by the FFI target name each is registered under.
TARGETS = {"jaxdit_topk_f32": "JaxditTopK", "jaxdit_weighted_rows": "JaxditWeightedRows",
           "jaxdit_row_products": "JaxditRowProducts", "jaxdit_scatter_rows": "JaxditScatterRows",
           "jaxdit_scatter_rows_dot": "JaxditScatterRowsDot"}
# The source picks AVX-512 / AVX2 code at run time, so no -march flag ties the build to a host; products are
# never fused into additions, so every machine gets the same bits.
FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC")


def cache_dir() -> Path:
    return Path(os.environ.get("JAXDIT_CACHE_DIR") or Path.home() / ".cache" / "jaxdit")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(out_dir: Path | None = None) -> Path:
    """Compile the library (once per source, compiler and jaxlib) -> its path.

    Raises RuntimeError naming the compiler and its first error line when it cannot be built.
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    command = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}"]
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(command + [jaxlib.__version__]).encode())
    name = f"cpu_kernels-{digest.hexdigest()[:16]}.so"
    # A home that takes no files (a locked-down cluster node) falls back to the machine's temporary directory.
    dirs = [out_dir] if out_dir else [cache_dir(), Path(tempfile.gettempdir()) / f"jaxdit-{os.getuid()}"]
    built = next((d / name for d in dirs if (d / name).exists()), None)
    if built:
        return built
    out_dir, tmp = _new_file_in(dirs)
    path = out_dir / name
    try:
        done = subprocess.run(command + [str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:200])
            raise RuntimeError(f"{cxx} failed on {SOURCE.name}: {first}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _new_file_in(dirs: list[Path]) -> tuple[Path, str]:
    """(the first of `dirs` that takes a new file, the path of an empty temporary file made there)."""
    def attempt(d: Path) -> tuple[Path, str]:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
        os.close(fd)
        return d, tmp

    for d in dirs[:-1]:
        try:
            return attempt(d)
        except OSError:
            continue
    return attempt(dirs[-1])


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered (False, with one warning, when they cannot be)."""
    if os.environ.get("JAXDIT_CPU_KERNELS", "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
        # Only news where the CPU is what runs: an accelerator host without a compiler loses nothing.
        report = log.warning if jax.default_backend() == "cpu" else log.info
        report("the CPU kernels are off (the XLA versions run instead, slower): %s", e)
        return False
    return True


def _on_cpu(target: str, out: jax.ShapeDtypeStruct | tuple, operands: tuple, fallback,
            vmap_method: str = "sequential", **attrs):
    """The kernel `target` on CPU, `fallback(*operands)` (the same results) on other platforms or
    where the kernels are off. Chosen when the program is lowered (`lax.platform_dependent`)."""
    if not available():
        return fallback(*operands)
    kernel = jax.ffi.ffi_call(target, out, vmap_method=vmap_method)

    def cpu(*ops):
        results = kernel(*ops, **attrs)
        results = _varying_like(ops, results if isinstance(out, tuple) else (results,))
        return results if isinstance(out, tuple) else results[0]

    return lax.platform_dependent(*operands, cpu=cpu, default=fallback)


def _varying_like(operands, outs) -> tuple[jax.Array, ...]:
    """Inside shard_map an FFI call's results are typed invariant; they vary where its operands do (each
    device ran the kernel on its own blocks), as XLA's own ops' would."""
    vma = set()
    for x in operands:
        aval = jax.typeof(x)
        manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; other releases call it vma
        vma |= set(manual.varying if manual is not None else getattr(aval, "vma", ()))
    return tuple(lax.pcast(o, tuple(sorted(vma)), to="varying") if vma else o for o in outs)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(x, k)` over the last axis -> (values, int32 indices), bit for bit.

    Not differentiable: callers take it without gradient, as the SAE's selection does.
    """
    x = jnp.asarray(x)
    fallback = lambda x: tuple(lax.top_k(x, k))  # noqa: E731
    if x.dtype != jnp.float32 or x.ndim == 0 or x.size == 0 or not 1 <= k <= x.shape[-1]:
        return fallback(x)
    shape = x.shape[:-1] + (k,)
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
    return _on_cpu("jaxdit_topk_f32", out, (x,), fallback, vmap_method="broadcast_all", k=int(k))


# The k-sparse products of sparse.py, float32, with the XLA version each replaces as the fallback. Not
# differentiable: they are the insides of sparse.py's custom VJPs.

def _f32(*arrays) -> bool:
    return all(a.dtype == jnp.float32 and a.ndim == 2 and a.size for a in arrays)


def weighted_rows(table: jax.Array, index: jax.Array, weight: jax.Array, fallback) -> jax.Array:
    """sum_j weight[b, j] * table[index[b, j]] -> [B, d] (table [m, d], index int32 / weight [B, k])."""
    if not _f32(table, weight) or index.dtype != jnp.int32:
        return fallback(table, index, weight)
    out = jax.ShapeDtypeStruct((index.shape[0], table.shape[1]), jnp.float32)
    return _on_cpu("jaxdit_weighted_rows", out, (table, index, weight), fallback)


def row_products(table: jax.Array, index: jax.Array, src: jax.Array, fallback) -> jax.Array:
    """src[b] . table[index[b, j]] -> [B, k] (table [m, d], index [B, k] int32, src [B, d])."""
    if not _f32(table, src) or index.dtype != jnp.int32:
        return fallback(table, index, src)
    return _on_cpu("jaxdit_row_products", jax.ShapeDtypeStruct(index.shape, jnp.float32), (table, index, src), fallback)


def scatter_rows(index: jax.Array, weight: jax.Array, src: jax.Array, m: int, fallback,
                 transposed: bool = False) -> jax.Array:
    """[m, d] zeros whose row index[b, j] accumulates weight[b, j] * src[b] (index / weight [B, k], src [B, d]);
    its transpose [d, m] with `transposed` (`fallback` returns the [m, d] form either way)."""
    xla = (lambda *ops: fallback(*ops).T) if transposed else fallback
    if not _f32(weight, src) or index.dtype != jnp.int32:
        return xla(index, weight, src)
    shape = (src.shape[1], m) if transposed else (m, src.shape[1])
    return _on_cpu("jaxdit_scatter_rows", jax.ShapeDtypeStruct(shape, jnp.float32), (index, weight, src), xla,
                   transposed=transposed)


def scatter_rows_dot(index: jax.Array, weight: jax.Array, src: jax.Array, table: jax.Array,
                     fallback) -> tuple[jax.Array, jax.Array]:
    """(scatter_rows(index, weight, src, m), row_products(table, index, src)) for table [m, d] in one pass
    over the rows (`fallback` returns the same pair)."""
    if not _f32(weight, src, table) or index.dtype != jnp.int32:
        return fallback(index, weight, src, table)
    out = (jax.ShapeDtypeStruct(table.shape, jnp.float32), jax.ShapeDtypeStruct(index.shape, jnp.float32))
    return _on_cpu("jaxdit_scatter_rows_dot", out, (index, weight, src, table), fallback)
