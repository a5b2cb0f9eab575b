"""The real data path on small local fixtures in the hub's own schemas, and its offline failure."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from coalora.artifacts import read_jsonl
from coalora.data.hub import write_hub
from coalora.data.layout import FILES, data_file
from coalora.errors import OfflineError, UserError
from coalora.params import load_params, validate
from coalora.stages.core import StageContext
from coalora.stages.data import STAGE

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hub"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to reach a non-loopback host; the test asserts there was none."""
    attempts: list = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in LOOPBACK and not host.startswith("/"):
            attempts.append(address)
            raise OSError(101, "network is unreachable (blocked by the test)")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK and host is not None:
            attempts.append(host)
            raise socket.gaierror(-3, "name resolution blocked by the test")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert not attempts, f"the test tried to reach the network: {attempts}"


def spec(path, split, data_files=None, name=None, max_examples=None) -> dict:
    return {"path": str(path), "name": name, "split": split, "data_files": data_files, "max_examples": max_examples}


def local_data(**overrides) -> dict:
    """A ``data`` section that points every dataset at the fixtures."""
    data = {
        "source": "hub",
        # the whole fixture shard (4 pages); the 3 that c4_train takes are dropped from it (layout.py)
        "c4_pretrain": spec(FIXTURES / "c4", "train", "en/c4-train.00000-of-01024.json.gz", "en"),
        "c4_train": spec(FIXTURES / "c4", "train", "en/c4-train.00000-of-01024.json.gz", "en", max_examples=3),
        "c4_validation": spec(FIXTURES / "c4", "validation", "en/c4-validation.00000-of-00008.json.gz", "en"),
        "instruct": spec(FIXTURES / "alpaca_data_cleaned.json", "train"),
        "boolq": spec(FIXTURES / "boolq.jsonl", "validation"),
        "arc_easy": spec(FIXTURES / "arc_easy.jsonl", "test"),
        "arc_challenge": spec(FIXTURES / "arc_challenge.jsonl", "test"),
        "winogrande": spec(FIXTURES / "winogrande.jsonl", "validation"),
    }
    return data | overrides


def params_for(data: dict):
    raw = load_params(ROOT, "smoke").model_dump(mode="json")
    raw["data"] = {"packaged": raw["data"]["packaged"]} | data   # the packaged sizes stay as params.yaml has them
    return validate(raw)


def test_params_defaults_name_the_datasets_lm_eval_uses():
    data = load_params(ROOT).data
    assert (data.boolq.path, data.boolq.name, data.boolq.split) == ("aps/super_glue", "boolq", "validation")
    assert (data.arc_easy.path, data.arc_easy.name, data.arc_easy.split) == ("allenai/ai2_arc", "ARC-Easy", "test")
    assert (data.arc_challenge.name, data.arc_challenge.split) == ("ARC-Challenge", "test")
    assert (data.winogrande.path, data.winogrande.name, data.winogrande.split) == (
        "allenai/winogrande", "winogrande_xl", "validation")


def test_write_hub_converts_local_copies_to_the_layout(tmp_path, no_network):
    summary = write_hub(params_for(local_data()), tmp_path)
    rows = {key: read_jsonl(data_file(tmp_path, key)) for key in FILES}
    assert {key: len(r) for key, r in rows.items()} == {
        "c4_pretrain": 1, "c4_train": 3, "c4_validation": 2, "instruct": 3, "boolq": 3, "arc_easy": 3,
        "arc_challenge": 2,
        "winogrande": 3}
    assert summary["files"] == {FILES[key]: len(r) for key, r in rows.items()}
    assert summary["labels"]["boolq"] == {"0": 1, "1": 2}
    assert summary["c4_pretrain_dropped"] == 3
    assert not {r["text"] for r in rows["c4_pretrain"]} & {r["text"] for r in rows["c4_train"] + rows["c4_validation"]}
    # C4: the timestamp stays the string C4 serves (datasets parses it into a datetime on the way)
    assert rows["c4_train"][0] == {
        "text": "Spring Pottery Workshop Opens in Riverton!\nAlways wanted to throw a bowl? Our six-week class "
                "starts in May, and beginners are welcome.",
        "timestamp": "2019-04-25T12:57:54Z", "url": "https://riverton-clay.example.com/spring-pottery-workshop/"}
    assert set(rows["c4_validation"][1]) == {"text", "timestamp", "url"}
    assert rows["instruct"][2] == {"instruction": "Rewrite the sentence so that it is more descriptive.",
                                   "input": "the cat sat on the windowsill",
                                   "output": "The cat sat quietly on the warm windowsill."}
    assert rows["boolq"][1] == {"question": "can penguins fly through the air", "idx": 1, "label": 0,
                                "passage": read_jsonl(FIXTURES / "boolq.jsonl")[1]["passage"]}
    # ARC keeps its own quirks: numeric labels, three or five choices
    assert rows["arc_easy"][2]["choices"]["label"] == ["1", "2", "3"] and rows["arc_easy"][2]["answerKey"] == "2"
    assert len(rows["arc_challenge"][1]["choices"]["text"]) == 5
    assert rows["winogrande"][1] == {"sentence": "The trophy does not fit in the suitcase because _ is too small.",
                                     "option1": "trophy", "option2": "suitcase", "answer": "2"}
    json.dumps(summary)


def test_pretraining_text_equal_to_the_fine_tuning_text_is_refused(tmp_path, no_network):
    c4 = spec(FIXTURES / "c4", "train", "en/c4-train.00000-of-01024.json.gz", "en", max_examples=3)
    with pytest.raises(UserError, match=r"data\.c4_pretrain: every document is also in data\.c4_train"):
        write_hub(params_for(local_data(c4_pretrain=c4, c4_train=c4)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_boolq_answer_bool_and_parquet_are_converted(tmp_path, no_network):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_jsonl(FIXTURES / "arc_easy.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arc.parquet")
    data = local_data(boolq=spec(FIXTURES / "boolq_google.jsonl", "validation"),
                      arc_easy=spec(tmp_path / "arc.parquet", "test", max_examples=2))
    write_hub(params_for(data), tmp_path / "out")
    boolq = read_jsonl(data_file(tmp_path / "out", "boolq"))
    assert [(r["label"], r["idx"]) for r in boolq] == [(1, 0), (0, 1)]
    assert set(boolq[0]) == {"question", "passage", "idx", "label"}
    assert read_jsonl(data_file(tmp_path / "out", "arc_easy")) == rows[:2]


def test_offline_hub_id_names_the_key_and_how_to_fetch(tmp_path, monkeypatch, no_network):
    import datasets
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # the libraries read the variables when first imported; make the running process agree
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = local_data(boolq=spec("aps/super_glue", "validation", name="boolq"))
    with pytest.raises(OfflineError) as err:
        write_hub(params_for(data), tmp_path / "out")
    message = str(err.value)
    assert "data.boolq" in message and "aps/super_glue (name=boolq, split=validation)" in message
    assert "hf download aps/super_glue --repo-type dataset --local-dir data/hub/aps--super_glue" in message
    assert "huggingface-cli download" in message and "data.boolq.path" in message
    assert "Traceback" not in message and not (tmp_path / "out" / FILES["boolq"]).exists()

    c4 = local_data(c4_train=spec("allenai/c4", "train", "en/c4-train.00000-of-01024.json.gz", "en", 100))
    with pytest.raises(OfflineError, match=r"(?s)data\.c4_train: dataset allenai/c4 .*--include "
                                           r"'en/c4-train\.00000-of-01024\.json\.gz'"):
        write_hub(params_for(c4), tmp_path / "out2")


@pytest.mark.parametrize("key,rows,needle", [
    ("arc_easy", [{"id": "x", "question": "q?", "answerKey": "A"}], "no column 'choices'"),
    ("winogrande", [{"sentence": "A or _ ?", "option1": "a", "option2": "b", "answer": ""}], "data.winogrande.split"),
    ("boolq", [{"question": "q", "passage": "p", "idx": 0, "label": -1}], "data.boolq.split"),
])
def test_bad_rows_name_the_key(tmp_path, no_network, key, rows, needle):
    path = tmp_path / f"{key}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = local_data(**{key: spec(path, "validation")})
    with pytest.raises(UserError, match=needle):
        write_hub(params_for(data), tmp_path / "out")


def test_unreadable_local_copy_is_a_user_error(tmp_path, no_network):
    bad = tmp_path / "winogrande.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match=r"data\.winogrande\.path: could not read the local dataset"):
        write_hub(params_for(local_data(winogrande=spec(bad, "validation"))), tmp_path / "out")
    odd = tmp_path / "winogrande.txt"
    odd.write_text("x")
    with pytest.raises(UserError, match=r"data\.winogrande\.path: cannot tell the format"):
        write_hub(params_for(local_data(winogrande=spec(odd, "validation"))), tmp_path / "out")


def test_stage_uses_the_hub_path_with_paths_relative_to_the_project_root(tmp_path, no_network):
    project = tmp_path / "project"
    shutil.copytree(FIXTURES, project / "data" / "hub")
    relative = {key: {**value, "path": str(Path("data/hub") / Path(value["path"]).relative_to(FIXTURES))}
                for key, value in local_data().items() if key != "source"}
    ctx = StageContext(root=project, out=tmp_path / "out", work=tmp_path / "work", inputs={}, progress=False)
    summary = STAGE.fn(params_for({"source": "hub", **relative}), ctx)
    assert summary["source"] == "hub" and summary["datasets"]["boolq"] == "data/hub/boolq.jsonl (split=validation)"
    assert all((tmp_path / "out" / rel).is_file() for rel in FILES.values())
