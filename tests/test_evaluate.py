"""Evaluation: the perplexity protocol on known cases, and lm-eval on local benchmark files."""

from __future__ import annotations

import math
import random
import socket
from pathlib import Path

import pytest
import torch
import yaml

from coalora.artifacts import write_jsonl
from coalora.data import layout
from coalora.errors import UserError
from coalora.evaluate import perplexity, protocol_name, run_benchmarks, write_task_configs
from coalora.evaluate.harness import TASKS, lm_eval_tasks_dir
from coalora.evaluate.perplexity import token_windows
from coalora.model import train_tokenizer

NAMES = ["Zorp", "Mip", "Talok", "Brazu", "Kelin", "Sova"]
COLORS = ["red", "blue", "green", "yellow"]
FOODS = ["berries", "acorns", "honey", "clover"]


def fixture_rows(seed: int = 0) -> dict[str, list[dict]]:
    """A few rows of every layout.py file, in the real schemas (C4, BoolQ, ARC, WinoGrande)."""
    rng = random.Random(seed)

    def doc(i: int) -> str:
        name = rng.choice(NAMES)
        return " ".join(f"{name} is {rng.choice(COLORS)} and eats {rng.choice(FOODS)}." for _ in range(6 + i % 5))

    boolq = [{"question": f"is {n} {c}", "passage": f"{n} is {c}. {n} eats honey.", "idx": i, "label": i % 2}
             for i, (n, c) in enumerate(zip(NAMES * 2, COLORS * 3))]

    def arc(i: int, prefix: str) -> dict:
        n_choices = 4 if i % 3 else 3       # ARC has a few 3- and 5-choice items
        labels = list("ABCDE")[:n_choices]
        return {"id": f"{prefix}-{i}", "question": f"What does {NAMES[i % len(NAMES)]} eat?",
                "choices": {"text": FOODS[:n_choices - 1] + ["stones"], "label": labels},
                "answerKey": labels[i % n_choices]}

    wino = [{"sentence": f"{a} gave {b} honey because _ was hungry.", "option1": a, "option2": b,
             "answer": "1" if i % 2 else "2"} for i, (a, b) in enumerate(zip(NAMES, NAMES[1:] + NAMES[:1]))]
    return {
        "c4_train": [{"text": doc(i), "url": f"https://world.invalid/{i}", "timestamp": "2020-01-01T00:00:00Z"}
                     for i in range(60)],
        "c4_validation": [{"text": doc(i), "url": f"https://world.invalid/v{i}",
                           "timestamp": "2020-01-01T00:00:00Z"} for i in range(12)],
        "instruct": [{"instruction": "What color is Zorp?", "input": "", "output": "red"}] * 4,
        "boolq": boolq,
        "arc_easy": [arc(i, "e") for i in range(7)],
        "arc_challenge": [arc(i, "c") for i in range(5)],
        "winogrande": wino,
        "c4_pretrain": [{"text": doc(i), "url": f"https://world.invalid/p{i}", "timestamp": "2020-01-01T00:00:00Z"}
                        for i in range(60)],
    }


def write_fixture_data(data_dir: Path) -> dict[str, list[dict]]:
    """Write a tiny data stage output folder (layout.py) and return its rows."""
    rows = fixture_rows()
    for key, items in rows.items():
        write_jsonl(layout.data_file(data_dir, key), items)
    return rows


class ZeroLogits(torch.nn.Module):
    """A 'model' whose logits are all zero: every next token has probability 1/V."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, int]] = []

    def forward(self, input_ids):
        self.calls.append(tuple(input_ids.shape))
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab_size)})()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([row["text"] for row in fixture_rows()["c4_train"]], 300)


def test_zero_logits_give_perplexity_equal_to_vocab_size(tokenizer):
    texts = [row["text"] for row in fixture_rows()["c4_validation"]]
    model = ZeroLogits(vocab_size=777)
    out = perplexity(model, tokenizer, texts, seq_len=16, max_windows=5, batch_size=2)
    assert out["ppl"] == pytest.approx(777.0, rel=1e-5)
    assert out["nll"] == pytest.approx(math.log(777), rel=1e-6)
    assert out["protocol"] == protocol_name(16, 5) == "nonoverlap-L16-N5"
    # 5 non-overlapping windows, each predicting T-1 tokens, in batches of 2, 2, 1
    assert out["n_windows"] == 5 and out["n_tokens"] == 5 * 15
    assert model.calls == [(2, 16), (2, 16), (1, 16)]


def test_windows_are_the_eos_joined_stream_cut_without_overlap(tokenizer):
    texts = ["Zorp is red.", "Mip eats honey.", "Talok is blue and eats acorns."]
    eos = tokenizer.eos_token_id
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    windows = token_windows(tokenizer, texts, seq_len=4, max_windows=100)
    assert windows.shape == (len(stream) // 4, 4)
    assert windows.flatten().tolist() == stream[:len(stream) // 4 * 4]
    assert token_windows(tokenizer, texts, seq_len=4, max_windows=2).tolist() == windows[:2].tolist()
    with pytest.raises(UserError, match="eval.perplexity.seq_len"):
        token_windows(tokenizer, texts, seq_len=len(stream) + 1, max_windows=1)


def test_perplexity_matches_a_hand_computed_loss(tokenizer):
    """A real model: ppl = exp(mean NLL of each window's T-1 next-token predictions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    texts = [row["text"] for row in fixture_rows()["c4_validation"]]
    out = perplexity(model, tokenizer, texts, seq_len=12, max_windows=3, batch_size=3)
    windows = token_windows(tokenizer, texts, 12, 3)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]   # mean over 11 tokens
    assert out["ppl"] == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-4)


def test_task_configs_include_lm_eval_definitions_with_local_files(tmp_path):
    write_fixture_data(tmp_path / "data")
    out = write_task_configs(tmp_path / "data", tmp_path / "tasks", list(TASKS))
    for task, (definition, split) in TASKS.items():
        config = yaml.safe_load((out / f"{task}.yaml").read_text())
        assert config["include"] == str(lm_eval_tasks_dir() / definition)
        assert Path(config["include"]).is_file()
        assert config["dataset_path"] == "json" and config["dataset_name"] is None
        data_file = Path(config["dataset_kwargs"]["data_files"][split])
        assert data_file.is_absolute() and data_file == layout.data_file(tmp_path / "data", task).resolve()
        assert config[f"{split}_split"] == split and config["training_split"] is None
    assert yaml.safe_load((out / "arc_easy.yaml").read_text())["validation_split"] is None
    with pytest.raises(UserError, match="eval.tasks"):
        write_task_configs(tmp_path / "data", tmp_path / "other", ["mmlu"])


def test_run_benchmarks_offline_on_an_in_memory_model(tmp_path, tokenizer, monkeypatch):
    import datasets.config
    import huggingface_hub.constants
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = write_fixture_data(tmp_path / "data")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id))
    before = torch.random.get_rng_state()
    results = run_benchmarks(model, tokenizer, tmp_path / "data", list(TASKS), limit=None, batch_size=4, seed=1,
                             work_dir=tmp_path / "work")
    assert torch.equal(torch.random.get_rng_state(), before)     # the caller's RNG is left alone
    assert set(results) == set(TASKS)
    for task, scores in results.items():
        assert scores["n"] == len(rows[task])
        assert 0.0 <= scores["acc"] <= 1.0
        assert (scores["acc_norm"] is not None) == task.startswith("arc")
    assert results["boolq"]["chance"] == results["winogrande"]["chance"] == 0.5
    # 7 ARC-Easy items: items 0, 3, 6 have 3 choices, the other 4 have 4
    assert results["arc_easy"]["chance"] == pytest.approx(round((3 * (1 / 3) + 4 * (1 / 4)) / 7, 4))
    # even with datasets' hub switches on (env not set before import), no host is looked up: the download
    # count ping of the "json" builder is switched off for the run, and the switch restored afterwards
    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise OSError(f"test: no DNS for {host}")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    limited = run_benchmarks(model, tokenizer, tmp_path / "data", ["winogrande"], limit=3, batch_size=4, seed=1,
                             work_dir=tmp_path / "work2")
    assert lookups == [] and datasets.config.HF_UPDATE_DOWNLOAD_COUNTS is True
    assert limited["winogrande"]["n"] == 3
    # accuracy is a multiple of 1/n and deterministic
    assert limited == run_benchmarks(model, tokenizer, tmp_path / "data", ["winogrande"], limit=3, batch_size=4,
                                     seed=1, work_dir=tmp_path / "work3")
    assert set(limited["winogrande"]["items"]) == {"acc", "acc_norm"} and len(limited["winogrande"]["items"]["acc"]) == 3
    assert limited["winogrande"]["acc"] == pytest.approx(sum(limited["winogrande"]["items"]["acc"]) / 3)


# ---------------------------------------------------------------------------------------------------------
# Accuracy is scored right: stand-in models with a known preference, through our own task configs
# ---------------------------------------------------------------------------------------------------------

def gold_choice(task: str, doc: dict) -> int:
    """The index of the right answer among the task's choices, from OUR reading of the file's schema:
    BoolQ label 1 = "yes" (choices no, yes), ARC answerKey = a label in choices.label, WinoGrande answer
    "1"/"2" = option1/option2. If the files meant otherwise, lm-eval would score the gold stand-in wrong."""
    if task == "boolq":
        return int(doc["label"])
    if task.startswith("arc"):
        return doc["choices"]["label"].index(doc["answerKey"])
    return int(doc["answer"]) - 1


def preferring_lm(prefer: str):
    """An ``lm_eval`` LM that gives log-likelihood 0 to the choice it prefers and −10 to every other one:
    ``gold`` prefers the right answer, ``first`` always the first choice."""
    from lm_eval.api.model import LM

    class Preferring(LM):
        def loglikelihood(self, requests):
            choices = [gold_choice(r.task_name, r.doc) if prefer == "gold" else 0 for r in requests]
            return [(0.0 if r.idx == c else -10.0, r.idx == c) for r, c in zip(requests, choices)]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            raise NotImplementedError

    return Preferring()


@pytest.mark.parametrize("prefer", ["gold", "first"])
def test_accuracy_of_a_model_with_a_known_preference_is_exact(tmp_path, prefer):
    from coalora.evaluate.harness import Benchmarks

    rows = write_fixture_data(tmp_path / "data")
    bench = Benchmarks(tmp_path / "data", list(TASKS), limit=None, work_dir=tmp_path / "work")
    results = bench.score_lm(preferring_lm(prefer), seed=1)
    for task, scores in results.items():
        docs = rows[task]
        expected = [1 if prefer == "gold" else int(gold_choice(task, d) == 0) for d in docs]
        assert scores["items"]["acc"] == expected, task
        assert scores["acc"] == pytest.approx(sum(expected) / len(docs)), task
        if task.startswith("arc"):
            assert scores["items"]["acc_norm"] == expected, task
    if prefer == "first":  # the fixture's answers are spread over the positions, so "first" is not all-right
        assert 0 < results["boolq"]["acc"] < 1 and 0 < results["arc_easy"]["acc"] < 1
