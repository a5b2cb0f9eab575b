"""Base models: tokenizer and model round trips, pretraining, loading errors, and the base_model stage."""

from __future__ import annotations

import json

import pytest
import torch

from coalora.errors import OfflineError, UserError
from coalora.model import build_model, builtin_config, load_base, load_model, pretrain, train_tokenizer
from coalora.model.builtin import MIN_LR_RATIO, lr_at
from coalora.params import load_params
from test_evaluate import fixture_rows, write_fixture_data

TEXTS = [row["text"] for row in fixture_rows()["c4_train"]]
SAMPLES = ["Zorp is red and eats honey.", "  two  spaces\nand a newline", "ünïcödé ✓ 🐉", ""]


@pytest.fixture(scope="module")
def smoke(repo_root):
    return load_params(repo_root, "smoke")


@pytest.fixture(scope="module")
def tokenizer(smoke):
    return train_tokenizer(TEXTS, smoke.model.builtin.vocab_size)


def test_tokenizer_round_trips_through_save_pretrained(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in SAMPLES + TEXTS[:5]:
        ids = tokenizer(text)["input_ids"]
        assert reloaded(text)["input_ids"] == ids
        assert reloaded.decode(ids) == text            # byte-level: lossless, no special tokens added
    assert reloaded.eos_token_id == reloaded.pad_token_id == tokenizer.eos_token_id
    assert len(reloaded) == len(tokenizer) <= 400


def test_tokenizer_training_is_deterministic_and_learns_merges(tokenizer, smoke):
    again = train_tokenizer(TEXTS, smoke.model.builtin.vocab_size)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer("Zorp eats berries.")["input_ids"]) < len("Zorp eats berries.")   # merges are used


def test_model_from_config_saves_and_reloads_with_identical_logits(tmp_path, tokenizer, smoke):
    b = smoke.model.builtin
    config = builtin_config(b, tokenizer)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (len(tokenizer), b.hidden_size,
                                                                                  b.num_layers)
    assert config.max_position_embeddings == b.seq_len and config.eos_token_id == tokenizer.eos_token_id
    model = build_model(b, tokenizer, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(),
                                                 build_model(b, tokenizer, seed=3).state_dict().values()))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded, reloaded_tok = load_model(str(tmp_path))
    ids = torch.tensor([reloaded_tok("Zorp is red and eats honey.")["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    half, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_lr_schedule_warms_up_then_decays_to_the_floor(smoke):
    b = smoke.model.builtin.model_copy(update={"steps": 100, "warmup_steps": 10, "lr": 1.0})
    assert lr_at(0, b) == pytest.approx(0.1)
    assert lr_at(9, b) == pytest.approx(1.0) == lr_at(10, b)
    assert lr_at(99, b) == pytest.approx(MIN_LR_RATIO, abs=1e-3)
    assert all(lr_at(s, b) >= lr_at(s + 1, b) for s in range(10, 99))


def test_pretraining_lowers_the_loss_and_is_deterministic(tokenizer, smoke):
    b = smoke.model.builtin.model_copy(update={"steps": 12, "lr": 0.01})
    runs = []
    for seed in (5, 5, 6):
        model = build_model(b, tokenizer, seed=0)
        stats = pretrain(model, tokenizer, TEXTS, b, seed=seed, progress=False)
        runs.append((model.state_dict(), stats))
    (first, stats), (second, _), (other, _) = runs
    assert stats["final_loss"] < stats["initial_loss"] - 1.0
    assert stats["tokens_seen"] == 12 * b.batch_size * b.seq_len and stats["steps"] == 12
    assert all(torch.equal(first[k], second[k]) for k in first)             # same seed: same weights
    assert not all(torch.equal(first[k], other[k]) for k in first)          # another batch order


def test_missing_local_folder_is_a_clear_user_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="model.name_or_path") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="model.dtype"):
        load_model(str(tmp_path / "empty"), dtype="int8")


def test_unknown_hub_id_offline_names_the_model_and_how_to_prefetch(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:      # conftest's guard fails the test on any network access
        load_model("coalora-tests/no-such-model", revision="v1")
    message = str(info.value)
    assert "model.name_or_path" in message and "coalora-tests/no-such-model" in message
    assert "hf download coalora-tests/no-such-model --revision v1" in message
    assert "huggingface-cli download" in message


def _context(tmp_path, data_dir, name):
    from coalora.stages.core import StageContext

    out, work = tmp_path / name / "out", tmp_path / name / "work"
    out.mkdir(parents=True)
    return StageContext(root=tmp_path, out=out, work=work, inputs={"data": data_dir}, progress=False)


def test_base_model_stage_end_to_end_on_fixture_data(tmp_path, smoke):
    from coalora.stages.base_model import STAGE, build_base_model

    assert STAGE.params == ("seed", "model", "eval") and STAGE.deps == ("data",)
    rows = write_fixture_data(tmp_path / "data")
    ctx = _context(tmp_path, tmp_path / "data", "builtin")
    summary = build_base_model(smoke, ctx)
    json.dumps(summary)                                                   # JSON-able

    assert json.loads((ctx.out / "base.json").read_text()) == {"source": "builtin", "path": "model",
                                                                "revision": None}
    assert (ctx.out / "model" / "model.safetensors").is_file() and (ctx.out / "model" / "tokenizer.json").is_file()
    b = smoke.model.builtin
    per_block = 4 * b.hidden_size * b.hidden_size + 3 * b.hidden_size * b.intermediate_size   # q,k,v,o + MLP
    assert summary["n_params"]["block_linear"] == b.num_layers * per_block
    assert summary["n_params"]["total"] > summary["n_params"]["block_linear"]
    assert summary["perplexity"]["protocol"] == "nonoverlap-L64-N8"
    assert summary["perplexity"]["ppl"] < 0.5 * summary["untrained_ppl"]["ppl"]
    assert summary["pretrain"]["steps"] == b.steps
    for task, scores in summary["benchmarks"].items():
        assert scores["n"] == len(rows[task]) and 0 <= scores["acc"] <= 1
    metrics = json.loads((ctx.out / "metrics.json").read_text())
    assert metrics["ppl"] == round(summary["perplexity"]["ppl"], 4) and "boolq_acc" in metrics
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())

    # load_base gives back exactly the evaluated model
    model, tokenizer = load_base(ctx.out)
    from coalora.evaluate import perplexity
    texts = [row["text"] for row in rows["c4_validation"]]
    again = perplexity(model, tokenizer, texts, 64, 8, 8)
    assert again["ppl"] == pytest.approx(summary["perplexity"]["ppl"], rel=1e-6)

    # a local folder is referenced, never copied
    local = smoke.model_copy(update={"model": smoke.model.model_copy(update={"name_or_path": str(ctx.out / "model")})})
    ctx2 = _context(tmp_path, tmp_path / "data", "local")
    summary2 = build_base_model(local, ctx2)
    assert summary2["base"] == {"source": "local", "path": str((ctx.out / "model").resolve()), "revision": None}
    assert not (ctx2.out / "model").exists() and "untrained_ppl" not in summary2
    assert summary2["perplexity"]["ppl"] == pytest.approx(summary["perplexity"]["ppl"], rel=1e-6)


def test_base_model_stage_with_an_unavailable_hub_model_fails_clearly(tmp_path, smoke, monkeypatch):
    from coalora.stages.base_model import build_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_fixture_data(tmp_path / "data")
    hub = smoke.model_copy(update={"model": smoke.model.model_copy(update={"name_or_path": "coalora-tests/absent"})})
    ctx = _context(tmp_path, tmp_path / "data", "hub")
    with pytest.raises(OfflineError, match="coalora-tests/absent"):
        build_base_model(hub, ctx)
    assert list(ctx.out.iterdir()) == []


def test_builtin_model_without_pretraining_text_is_refused(tmp_path, smoke):
    """The packaged source writes no pretraining text: the built-in model would otherwise be pretrained on
    what it is then fine-tuned on (layout.py)."""
    from coalora.artifacts import write_jsonl
    from coalora.data import layout
    from coalora.stages.base_model import build_base_model

    write_fixture_data(tmp_path / "data")
    write_jsonl(layout.data_file(tmp_path / "data", "c4_pretrain"), [])
    ctx = _context(tmp_path, tmp_path / "data", "empty")
    with pytest.raises(UserError, match=r"model\.name_or_path: builtin needs pretraining text, and data\.source: "
                                        r"embedded has none"):
        build_base_model(smoke, ctx)
    assert list(ctx.out.iterdir()) == []
