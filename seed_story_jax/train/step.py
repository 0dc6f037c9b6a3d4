"""The train step: a pure function of (state, frozen, batch) closed over the graphdef, jitted once with
the state donated.

Per step: split the global batch into `grad_accum` equal microbatches (lax.scan, gradients summed in
fp32), average, clip and apply AdamW. The model computes in its configured dtype (bf16 compute with
the fp32 master params cast at use); losses are fp32. Remat is the model's own knob (`remat` in its
config section). A non-finite loss or gradient norm leaves the whole state untouched and is
reported as `finite = False`, so the loop can stop with the last good state and checkpoint intact.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from seed_story_jax.nn.sharding import fit_spec
from seed_story_jax.train.state import TrainState


def microbatches(batch: dict, n: int, mesh=None, batch_spec=None) -> dict:
    """(B, ...) → (n, B/n, ...). Microbatch a takes rows a, a+n, a+2n, ... so each one stays spread
    over every device that holds a slice of the batch (a contiguous split would not)."""

    def split(x):
        b = x.shape[0]
        y = x.reshape((b // n, n) + x.shape[1:]).swapaxes(0, 1)
        if mesh is not None and batch_spec is not None:
            spec = fit_spec(P(None, *batch_spec), y.shape, mesh)
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
        return y

    return jax.tree.map(split, batch)


def make_train_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    lr_fn: Callable | None = None, mesh=None, batch_spec=None) -> Callable:
    """train_step(state, frozen, batch) -> (new state, metrics dict of fp32 scalars)."""

    def grads_of(params, frozen, batch, key):
        def f(p):
            model = nnx.merge(graphdef, p, frozen)
            loss, metrics = loss_fn(model, batch, key)
            return loss.astype(jnp.float32), metrics

        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        metrics = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)
        return loss, metrics, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    def train_step(state: TrainState, frozen, batch):
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        if grad_accum == 1:
            loss, metrics, grads = grads_of(state.params, frozen, batch, step_key)
        else:
            mbs = microbatches(batch, grad_accum, mesh, batch_spec)
            keys = jax.random.split(step_key, grad_accum)
            first = jax.tree.map(lambda x: x[0], mbs)
            _, m_shape, _ = jax.eval_shape(grads_of, state.params, frozen, first, keys[0])
            zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t)  # noqa: E731

            def body(carry, xs):
                g_acc, l_acc, m_acc = carry
                loss, metrics, grads = grads_of(state.params, frozen, *xs)
                return (jax.tree.map(jnp.add, g_acc, grads), l_acc + loss, jax.tree.map(jnp.add, m_acc, metrics)), None

            init = (zeros(state.params), jnp.zeros((), jnp.float32), zeros(m_shape))
            (grads, loss, metrics), _ = jax.lax.scan(body, init, (mbs, keys))
            inv = 1.0 / grad_accum
            grads = jax.tree.map(lambda g: g * inv, grads)
            loss, metrics = loss * inv, jax.tree.map(lambda m: m * inv, metrics)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, rng=jax.random.key_data(key))
        # Keep the old state on a non-finite step: the loop stops and saves nothing after it.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        out = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32), **metrics}
        if lr_fn is not None:
            out["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
        return new, out

    return train_step


def jit_train_step(step_fn, state_shardings, frozen_shardings, batch_shardings, mesh):
    """jit with shardings pinned on both sides and the state donated (updated in place)."""
    metrics_sharding = NamedSharding(mesh, P())
    return jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))
