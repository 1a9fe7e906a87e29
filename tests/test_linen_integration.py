"""Someone else's model: a small Flax Linen ViT defined here, with ToMe and top-k pruning inserted between the
attention residual and the MLP using only the public ``reduction`` API."""

import jax
import pytest
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

import reduction as R


class LinenBlock(nn.Module):
    dim: int
    heads: int
    mode: str = "none"  # "tome" | "topk" | "none"
    amount: int = 0

    @nn.compact
    def __call__(self, state: R.TokenState) -> R.TokenState:
        x = state.x
        b, t, c = x.shape
        dh = c // self.heads
        y = nn.LayerNorm()(x)
        q, k, v = (nn.Dense(c, name=n)(y).reshape(b, t, self.heads, dh) for n in ("q", "k", "v"))
        bias = R.proportional_attention_bias(state.sizes)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(dh) + bias
        probs = jax.nn.softmax(logits, -1)
        x = x + nn.Dense(c, name="o")(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c))
        state = state.replace(x=x)
        if self.mode == "tome":
            state = R.tome_merge(state, k.mean(2), r=self.amount, class_token=True)
        elif self.mode == "topk":  # keep cls + the patches the class token attends to most
            score = probs[:, :, 0, 1:].mean(1)
            keep = jnp.sort(jax.lax.top_k(score, t - 1 - self.amount)[1] + 1, axis=-1)
            keep = jnp.concatenate([jnp.zeros((b, 1), keep.dtype), keep], 1)
            state = R.apply_step(state, R.prune_step(keep, t))
        x = state.x
        x = x + nn.Dense(c)(nn.gelu(nn.Dense(2 * c)(nn.LayerNorm()(x)), approximate=False))
        return state.replace(x=x)


class LinenViT(nn.Module):
    modes: tuple
    amount: int
    dim: int = 32

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(self.dim, (4, 4), strides=(4, 4))(images)
        b = x.shape[0]
        x = x.reshape(b, -1, self.dim)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], 1)
        state = R.init_state(x, track_source=True)
        for mode in self.modes:
            state = LinenBlock(self.dim, 2, mode, self.amount)(state)
        return state


def _run(modes, amount, eager=True):
    model = LinenViT(modes, amount)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)
    jitted = jax.jit(model.apply)(params, x)
    return (model.apply(params, x) if eager else jitted), jitted


@pytest.mark.long   # a whole Linen ViT compile
def test_linen_vit_with_tome():
    eager, jitted = _run(("tome", "tome", "none"), 4)
    assert eager.x.shape == (2, 17 - 8, 32)
    np.testing.assert_allclose(np.asarray(eager.sizes).sum(1), 17.0)
    np.testing.assert_allclose(np.asarray(jitted.x), np.asarray(eager.x), atol=1e-5)
    dense = R.unmerge(eager.x, eager.source)
    assert dense.shape == (2, 17, 32)


def test_linen_vit_with_topk_pruning():
    eager, jitted = _run(("topk", "none", "topk"), 3, eager=False)
    assert eager.x.shape == (2, 11, 32)
    src = np.asarray(eager.source)
    assert (src[:, 0] == 0).all() and (src == -1).sum(1).tolist() == [6, 6]
    np.testing.assert_allclose(np.asarray(eager.sizes), 1.0)  # pruning never merges
    np.testing.assert_allclose(np.asarray(jitted.x), np.asarray(eager.x), atol=1e-5)
