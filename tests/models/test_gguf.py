"""GGUF export: tensor names, shapes, types and metadata of llama.cpp's ``mamba`` / ``mamba2``
architectures, values after the documented transforms, tokenizer metadata, refusals; and (when
llama-cpp-python is installed) llama.cpp's greedy tokens on the exported file."""

import math

import numpy as np
import pytest
import torch

import ssmkit
from ssmkit.models.formats.gguf import output_file, save_gguf
from ssmkit.models.tokenizer import ByteTokenizer, HFTokenizer

gguf = pytest.importorskip("gguf")

# Odd sizes, so a transposed or mis-split tensor cannot pass for the right one.
MAMBA = dict(d_model=32, n_layer=2, vocab_size=257, tie_embeddings=False, eos_token_id=256,
             ssm_cfg={"d_state": 6, "d_conv": 3, "dt_rank": 5})
MAMBA2 = dict(d_model=32, n_layer=2, vocab_size=257, layer_pattern="22", eos_token_id=256,
              mamba2_cfg={"d_state": 8, "d_conv": 4, "headdim": 16, "ngroups": 2, "chunk_size": 16})


def _expected_mamba(n_embd=32, n_vocab=264, d_inner=64, d_state=6, d_conv=3, dt_rank=5):
    """llama.cpp's mamba loader: name -> ggml shape (ne: fastest dimension first)."""
    table = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,),
             "output.weight": (n_embd, n_vocab)}
    for i in range(2):
        table.update({
            f"blk.{i}.attn_norm.weight": (n_embd,), f"blk.{i}.ssm_in.weight": (n_embd, 2 * d_inner),
            f"blk.{i}.ssm_conv1d.weight": (d_conv, d_inner), f"blk.{i}.ssm_conv1d.bias": (d_inner,),
            f"blk.{i}.ssm_x.weight": (d_inner, dt_rank + 2 * d_state),
            f"blk.{i}.ssm_dt.weight": (dt_rank, d_inner), f"blk.{i}.ssm_dt.bias": (d_inner,),
            f"blk.{i}.ssm_a": (d_state, d_inner), f"blk.{i}.ssm_d": (d_inner,),
            f"blk.{i}.ssm_out.weight": (d_inner, n_embd)})
    return table


def _expected_mamba2(n_embd=32, n_vocab=264, d_inner=64, d_state=8, d_conv=4, n_head=4, n_group=2):
    """llama.cpp's mamba2 loader (tied embeddings: no output.weight)."""
    conv = d_inner + 2 * n_group * d_state
    table = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,)}
    for i in range(2):
        table.update({
            f"blk.{i}.attn_norm.weight": (n_embd,), f"blk.{i}.ssm_in.weight": (n_embd, d_inner + conv + n_head),
            f"blk.{i}.ssm_conv1d.weight": (d_conv, conv), f"blk.{i}.ssm_conv1d.bias": (conv,),
            f"blk.{i}.ssm_dt.bias": (n_head,), f"blk.{i}.ssm_a": (1, n_head), f"blk.{i}.ssm_d": (1, n_head),
            f"blk.{i}.ssm_norm.weight": (d_inner // n_group, n_group),
            f"blk.{i}.ssm_out.weight": (d_inner, n_embd)})
    return table


def _model(kw, seed=0):
    torch.manual_seed(seed)
    m = ssmkit.LanguageModel(ssmkit.ModelConfig(**kw)).eval()
    with torch.no_grad():  # move every parameter off its initial value (D = 1, norms = 1, ...)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("kw, arch, table", [(MAMBA, "mamba", _expected_mamba()),
                                             (MAMBA2, "mamba2", _expected_mamba2())])
def test_tensors_and_metadata_match_llama_cpp(tmp_path, kw, arch, table):
    m = _model(kw)
    path = save_gguf(m, tmp_path / "m.gguf", tokenizer=ByteTokenizer())
    r = gguf.GGUFReader(path)
    got = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}
    assert got == table
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    meta = _fields(r)
    ssm = ({"ssm.inner_size": 64, "ssm.state_size": 6, "ssm.conv_kernel": 3, "ssm.time_step_rank": 5,
            "ssm.dt_b_c_rms": False} if arch == "mamba" else
           {"ssm.inner_size": 64, "ssm.state_size": 8, "ssm.conv_kernel": 4, "ssm.time_step_rank": 4,
            "ssm.group_count": 2})
    want = {"general.architecture": arch, "general.type": "model", "general.file_type": 0,
            f"{arch}.context_length": 2**20, f"{arch}.embedding_length": 32, f"{arch}.block_count": 2,
            f"{arch}.feed_forward_length": 0, f"{arch}.attention.head_count": 0,
            **{f"{arch}.{k}": v for k, v in ssm.items()}}
    for k, v in want.items():
        assert meta[k] == v, k
    assert math.isclose(meta[f"{arch}.attention.layer_norm_rms_epsilon"], 1e-5, rel_tol=1e-6)


def _ours(m, name):
    """The GGUF tensor ``name`` computed from ssmkit's parameters by the documented transform."""
    sd = m.state_dict()
    if name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        return sd[{"token_embd.weight": "backbone.embedding.weight", "output_norm.weight": "backbone.norm_f.weight",
                   "output.weight": "lm_head.weight"}[name]]
    _, i, rest = name.split(".", 2)
    p = f"backbone.layers.{i}."
    mx = p + "mixer."
    mamba2 = m.config.layer_pattern[0] == "2"
    simple = {"attn_norm.weight": p + "norm.weight", "ssm_in.weight": mx + "in_proj.weight",
              "ssm_conv1d.bias": mx + "conv1d.bias", "ssm_x.weight": mx + "x_proj.weight",
              "ssm_dt.weight": mx + "dt_proj.weight", "ssm_out.weight": mx + "out_proj.weight",
              "ssm_dt.bias": mx + ("dt_bias" if mamba2 else "dt_proj.bias")}
    if rest in simple:
        return sd[simple[rest]]
    if rest == "ssm_conv1d.weight":
        return sd[mx + "conv1d.weight"][:, 0, :]
    if rest == "ssm_a":
        a = -torch.exp(sd[mx + "A_log"])
        return a[:, None] if mamba2 else a
    if rest == "ssm_d":
        return sd[mx + "D"][:, None] if mamba2 else sd[mx + "D"]
    assert rest == "ssm_norm.weight"
    return sd[mx + "norm.weight"].reshape(2, 32)


@pytest.mark.parametrize("kw", [MAMBA, MAMBA2], ids=["mamba", "mamba2"])
def test_values_round_trip(tmp_path, kw):
    m = _model(kw)
    r = gguf.GGUFReader(save_gguf(m, tmp_path, tokenizer=None))
    assert (tmp_path / "model.gguf").exists()
    for t in r.tensors:
        ours = _ours(m, t.name).numpy()
        assert t.data.shape == ours.shape and np.array_equal(t.data, ours), t.name


def test_weight_types(tmp_path):
    """Projection/embedding matrices take the type; norms, biases, A, D, conv stay f32; q8_0 needs
    rows of a multiple of 32 (ssm_dt's rows hold dt_rank = 5 values: f16)."""
    m = _model(MAMBA)
    Q = gguf.GGMLQuantizationType
    for dtype, qtype in (("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0)):
        r = gguf.GGUFReader(save_gguf(m, tmp_path / f"{dtype}.gguf", dtype=dtype))
        for t in r.tensors:
            matrix = t.name.endswith(("token_embd.weight", "output.weight", "ssm_in.weight", "ssm_x.weight",
                                      "ssm_dt.weight", "ssm_out.weight"))
            want = (Q.F16 if dtype == "q8_0" and t.name.endswith("ssm_dt.weight") else qtype) if matrix else Q.F32
            assert t.tensor_type == want, (dtype, t.name)
            if matrix:
                back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(_ours(m, t.name).shape)
                assert np.allclose(back, _ours(m, t.name).numpy(), atol=0.02), (dtype, t.name)
        assert _fields(r)["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]


def test_byte_tokenizer_metadata(tmp_path):
    meta = _fields(gguf.GGUFReader(save_gguf(_model(MAMBA), tmp_path / "m.gguf", tokenizer=ByteTokenizer())))
    toks, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(toks) == len(types) == 264
    # GPT-2's byte-level alphabet, in byte order: one token per byte.
    assert toks[ord("A")] == "A" and toks[ord(" ")] == "Ġ" and toks[ord("\n")] == "Ċ" and toks[0] == "Ā"
    assert toks[255] == "ÿ" and len(set(toks[:256])) == 256 and set(types[:256]) == {1}
    assert (toks[256], types[256]) == ("<|endoftext|>", 3)
    assert toks[257:] == [f"[PAD{i}]" for i in range(257, 264)] and set(types[257:]) == {5}
    assert meta["tokenizer.ggml.eos_token_id"] == 256 and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.merges"] == ["<|endoftext|> <|endoftext|>"]


def test_bytes_only_vocabulary_ends_text_at_nul(tmp_path):
    """ssmkit train --data models have 256 ids and no end-of-text; llama.cpp needs an EOS id."""
    meta = _fields(gguf.GGUFReader(save_gguf(_model({**MAMBA, "vocab_size": 256}), tmp_path / "m.gguf",
                                             tokenizer=ByteTokenizer())))
    assert len(meta["tokenizer.ggml.tokens"]) == 256 and "<|endoftext|>" not in meta["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.eos_token_id"] == 0 and set(meta["tokenizer.ggml.token_type"]) == {1}


def test_no_tokenizer_writes_token_ids_only(tmp_path):
    meta = _fields(gguf.GGUFReader(save_gguf(_model(MAMBA2), tmp_path / "m.gguf")))
    assert meta["tokenizer.ggml.model"] == "none" and meta["mamba2.vocab_size"] == 264
    assert "tokenizer.ggml.tokens" not in meta


TEXTS = ["state space models scan the sequence once", "Selective  scans,\tin 2 passes: 1234 + 56.7",
         "naïve café — ünïcödé 漢字 🙂", "  leading spaces\n\nand lines\r\n", "it's we'll they'd 'quoted'"]


def _bpe_tokenizer(tmp_path):
    """A GPT-2 / GPT-NeoX style tokenizer: byte-level BPE, GPT-2 split, <|endoftext|> = 0."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok, HFTokenizer(tmp_path / "tokenizer.json", eos_token_id=0)


@pytest.mark.peer
def test_byte_level_bpe_tokenizer_metadata(tmp_path):
    import tokenizers
    from tokenizers import models

    tok, hf = _bpe_tokenizer(tmp_path)
    m = _model({**MAMBA, "vocab_size": hf.vocab_size, "eos_token_id": 0})
    meta = _fields(gguf.GGUFReader(save_gguf(m, tmp_path / "m.gguf", tokenizer=hf)))
    vocab = tok.get_vocab(with_added_tokens=True)
    toks = meta["tokenizer.ggml.tokens"]
    assert len(toks) == m.config.padded_vocab_size
    assert all(toks[i] == t for t, i in vocab.items())
    assert meta["tokenizer.ggml.token_type"][0] == 3 and set(meta["tokenizer.ggml.token_type"][1:hf.vocab_size]) == {1}
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert meta["tokenizer.ggml.eos_token_id"] == 0

    word = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    word.save(str(tmp_path / "word.json"))
    with pytest.raises(ValueError, match="cannot export the tokenizer to GGUF: its model is 'WordLevel'"):
        save_gguf(m, tmp_path / "w.gguf", tokenizer=HFTokenizer(tmp_path / "word.json"))


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=32, n_layer=4, vocab_size=257, layer_pattern="MA2M", attn_cfg={"n_heads": 2}),
     "layer_pattern 'MA2M' has Mamba, Mamba-2, attention layers"),
    (dict(d_model=32, n_layer=2, vocab_size=257, layer_pattern="DD"), "has DeltaNet layers"),
    (dict(d_model=32, n_layer=2, vocab_size=257, mlp="swiglu"), "mlp='swiglu'"),
    (dict(d_model=32, n_layer=2, vocab_size=257, ssm_cfg={"expand": 3}), "only expand=2"),
    (dict(d_model=32, n_layer=2, vocab_size=257, rms_norm=False), "rms_norm=False"),
    ({**MAMBA2, "norm_eps": 1e-6}, "norm_eps=1e-06"),
    ({**MAMBA2, "mamba2_cfg": {"headdim": 16, "norm_before_gate": True}}, "norm_before_gate"),
    ({**MAMBA2, "mamba2_cfg": {"headdim": 16, "dt_limit": (0.0, 0.1)}}, "does not clamp dt"),
])
def test_models_gguf_cannot_hold_are_refused_before_writing(tmp_path, kw, match):
    m = ssmkit.LanguageModel(ssmkit.ModelConfig(**kw))
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="cannot export this model to GGUF: .*" + match.replace("(", r"\(")):
        save_gguf(m, target)
    assert target.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_bad_arguments(tmp_path):
    m = _model(MAMBA)
    with pytest.raises(ValueError, match=r"dtype must be one of \['f32', 'f16', 'bf16', 'q8_0'\], got 'q4'"):
        save_gguf(m, tmp_path / "m.gguf", dtype="q4")
    small = _model({**MAMBA, "vocab_size": 200})
    with pytest.raises(ValueError, match="the byte tokenizer needs 256 token ids; the model's vocabulary has 200"):
        save_gguf(small, tmp_path / "m.gguf", tokenizer=ByteTokenizer())
    (tmp_path / "file").write_text("keep")
    with pytest.raises(NotADirectoryError, match="file exists and is not a directory"):
        save_gguf(m, tmp_path / "file")
    assert output_file(tmp_path / "x.gguf") == tmp_path / "x.gguf"
    assert output_file(tmp_path / "dir") == tmp_path / "dir" / "model.gguf"


def test_save_pretrained_format_gguf(tmp_path):
    m = _model(MAMBA2)
    m.save_pretrained(tmp_path / "a", format="gguf")
    ssmkit.models.save_pretrained(m, tmp_path / "b.gguf", format="gguf", tokenizer=ByteTokenizer())
    assert gguf.GGUFReader(tmp_path / "a" / "model.gguf").fields["general.architecture"].contents() == "mamba2"
    assert len(gguf.GGUFReader(tmp_path / "b.gguf").fields["tokenizer.ggml.tokens"].contents()) == 264


@pytest.mark.peer
def test_llama_cpp_tokenizes_like_the_bpe_tokenizer(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, hf = _bpe_tokenizer(tmp_path)
    m = _model({**MAMBA, "vocab_size": hf.vocab_size, "eos_token_id": 0})
    llm = llama_cpp.Llama(model_path=str(save_gguf(m, tmp_path / "m.gguf", tokenizer=hf)), vocab_only=True,
                          verbose=False)
    for text in TEXTS + ["unseen words: Zebra quokka!", "<|endoftext|> is a special token here"]:
        ids = hf.encode(text)  # (tokenizers matches added tokens in the text: llama.cpp's special=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        if ids[0] != 0:  # (llama-cpp-python drops a space after a leading BOS, here <|endoftext|>)
            assert llm.detokenize(ids).decode() == hf.decode(ids), text
    llm.close()


# ------------------------------------------------------------------------------------------------
def _llama_greedy(path, prompt, n_new, vocab):
    """llama.cpp's greedy continuation of ``prompt``, the argmax over the tokenizer's ids (as
    ssmkit.generate, which never picks the embedding's padding rows), and its logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
    llm.eval(prompt)
    out, logits = [], []
    for _ in range(n_new):
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))[:vocab]
        logits.append(row.copy())
        out.append(int(np.argmax(row)))
        llm.eval([out[-1]])
    llm.close()
    return out, np.stack(logits)


@pytest.mark.peer
@pytest.mark.parametrize("kw", [MAMBA, MAMBA2], ids=["mamba", "mamba2"])
def test_llama_cpp_greedy_tokens_equal_ssmkit(tmp_path, kw):
    pytest.importorskip("llama_cpp")
    m = _model(kw, seed=1)
    with torch.no_grad():  # an embedding of unit scale: random logits far apart, tokens that vary
        m.backbone.embedding.weight.normal_(0, 1.0)
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embedding" not in name:
                p.mul_(2.0)
    tok = ByteTokenizer()
    prompt = tok.encode("Hello, state space world!")
    path = save_gguf(m, tmp_path / "m.gguf", tokenizer=tok)
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab_only = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in ["Hello, state space world!", *TEXTS, "\x00\x01\x7f bytes \x0b"]:
        data = text.encode()
        assert vocab_only.tokenize(data, add_bos=False, special=False) == list(data), text
        assert vocab_only.detokenize(list(data)) == data, text
    vocab_only.close()
    ours = ssmkit.generate(m, torch.tensor([prompt]), max_new_tokens=32)[0, len(prompt):].tolist()
    theirs, logits = _llama_greedy(path, prompt, 32, m.config.vocab_size)
    assert theirs == ours and len(set(ours)) > 2
    with torch.no_grad():
        ref = m(torch.tensor([prompt + ours[:-1]])).logits[0, len(prompt) - 1:, :m.config.vocab_size]
    assert np.allclose(logits, ref.numpy(), atol=1e-3 * float(ref.abs().max()))
