"""Training: every method lowers the loss, the budget is recorded, resume is exact, bad input is refused.

A tiny Llama (hidden 32, 2 blocks, vocabulary 100) built from a config, a character tokenizer and a few
lines of text: each method trains for a handful of steps in well under a second per step.

Why one file of ~430 lines: every test trains through the same tiny set-up at the top (model, tokenizer,
text, params); splitting would copy it or move it into a shared module for one reader.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

from coalora.artifacts import MANIFEST, build_manifest, read_json, write_json, write_jsonl
from coalora.errors import UserError
from coalora.params import LoraParams, SearchParams, TrainParams
from coalora.quant import QuantSpec
from coalora.space import config_from_rules, quantized_layers
from coalora.train import METHODS, TrainSetup, Trainer, target_set, train_method
from coalora.train.batches import IGNORE, instruct_table, text_batches, text_windows
from coalora.model.bnb_lora import skip_reason

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = "the cat sat on a mat and the dog ran to the red ball while a bird sang in the old tree".split()


class CharTokenizer:
    """Characters → ids 2 … 97 (pad 0, EOS 1): a tokenizer with the interface the batch code uses."""

    pad_token_id, eos_token_id, vocab_size = 0, 1, 100

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + ord(ch) % 96 for ch in text] for text in texts]}


def tiny_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "." for _ in range(n)]


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


LAYERS = quantized_layers(tiny_model(), TARGETS)


def spec(b0: int, b1: int = 8) -> QuantSpec:
    return QuantSpec(b0, b1, "fp16", 32, 16)


def tiny_pool():
    """Four uniform configs at ~2.3, ~3.3, ~4.3 and ~8.3 bits, in bits order."""
    return [config_from_rules(spec(b0), LAYERS, budget=float(b0)) for b0 in (2, 3, 4, 8)]


def tiny_unseen():
    """Two configs in none of the pools: coarser first-level scales (b1 = 4) at ~2.1 and ~3.1 bits."""
    return [config_from_rules(spec(b0, 4), LAYERS, budget=float(b0)) for b0 in (2, 3)]


def train_params(**overrides) -> TrainParams:
    values = dict(methods=["coalora"], target_bits=[2.3, 4.3], k=2, steps_per_config=8, joint_compute=1.0,
                  lr=0.01, grad_clip=1.0, batch_size=4, seq_len=32, dtype="float32", data="text",
                  eval_sequences=4, checkpoint_every=3, seed=None)
    return TrainParams(**{**values, **overrides})


def lora_params() -> LoraParams:
    return LoraParams.model_validate({"rank": 4, "alpha": 8.0, "dropout": 0.0, "cache_mb": 16,
                                      "confignet": {"embed_dim": 4, "hidden": 16, "init_std": 0.001}})


def search_params(**overrides) -> SearchParams:
    """Two proposal rounds (at steps 2 and 5 of coalora's 8-step joint run, after round 0; the final
    measurement at 8), two proposals each."""
    values = dict(rounds=2, q=2, n_segments=3, n_candidates=16, mc_samples=8, f1_sequences=2,
                  hv_reference=[1.1, 1.1])
    return SearchParams(**{**values, **overrides})


def tiny_setup(search: SearchParams | None = None, **overrides) -> TrainSetup:
    p = train_params(**overrides)
    tok = CharTokenizer()
    pool = tiny_pool()
    return TrainSetup(p, lora_params(), 7, tiny_model, LAYERS, pool, target_set(pool, p.target_bits),
                      text_batches(tok, tiny_texts(40, 1), p.seq_len, p.batch_size),
                      text_windows(tok, tiny_texts(20, 2), p.seq_len, p.eval_sequences), progress=False,
                      search=search or search_params(),
                      f1_batch=text_windows(tok, tiny_texts(20, 3), p.seq_len, 2))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these matrices are 32 wide, and on a busy 2-core machine thread hand-offs cost
    30× the arithmetic (measured: 0.8 s vs 24 s for one method)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Killed(Exception):
    """Stands in for a kill: raised from the step hook, after that step's checkpoint (if any)."""


def kill_at(step: int, run: str | None = None):
    def hook(trainer: Trainer) -> None:
        if trainer.step == step and (run is None or trainer.desc.endswith(run)):
            raise Killed(trainer.desc)
    return hook


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_lowers_the_held_out_loss_and_spends_its_budget(name, tmp_path):
    method = METHODS[name]
    if method.backend == "bnb" and skip_reason():
        pytest.skip(f"qlora-bnb cannot run here: {skip_reason()}")
    setup = tiny_setup()
    result = train_method(method, setup, tmp_path)
    assert result.skipped is None
    for run in result.runs:
        for config_id in run.configs:
            assert run.eval_after[config_id] < run.eval_before[config_id] - 0.05, (name, run.name)
    steps = [run.steps for run in result.runs]
    if method.runs == "per_config":
        assert steps == [8, 8] and [r.configs for r in result.runs] == [[c.id] for c in setup.targets]
    elif method.runs == "joint":  # equal compute: the 8 × 2 config-steps of one per-config method, K per step
        assert steps == [16 // method.k(setup.params)]
        assert sum(result.runs[0].draws.values()) == 16 == method.config_steps(setup.params, 2)
    else:
        assert steps == [8] and result.runs[0].configs == [config_from_rules(
            QuantSpec(4, 8, "fp32", 64, 256), LAYERS).id]


def test_coalora_draws_from_the_pool_and_shared_from_the_targets(tmp_path):
    setup = tiny_setup()
    frozen = train_method(METHODS["coalora-frozen"], setup, tmp_path / "f").runs[0]
    coalora = train_method(METHODS["coalora"], setup, tmp_path / "c").runs[0]
    shared = train_method(METHODS["shared"], setup, tmp_path / "s").runs[0]
    assert set(frozen.draws) == {c.id for c in setup.pool}  # 8 steps × 2 of 4 configs: all seen
    # coalora draws from the pool of each round: the initial one, then the rebuilt ones (proposals included)
    seen = [e["id"] for e in coalora.search["seen"]]
    pools = [{p["id"] for p in r["pool"]} for r in coalora.search["rounds"]]  # after rounds 0, 1, 2, final
    assert set(coalora.draws) <= set(seen) and set(coalora.draws) <= pools[0] | pools[1] | pools[2]
    assert {c.id for c in setup.targets} <= pools[-1]  # the targets stay in the pool
    assert set(shared.draws) == {c.id for c in setup.targets}
    assert coalora.configs == shared.configs == [c.id for c in setup.targets]


def adapters_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_seconds(search: dict | None) -> dict | None:
    """The search state minus wall-clock times (the one thing a resumed run may differ in)."""
    if search is None:
        return None
    return {**search, "rounds": [{k: v for k, v in r.items() if k != "seconds"} for r in search["rounds"]]}


@pytest.mark.parametrize("name, kill_step, run_index, first_resumed", [
    ("coalora", 7, 0, 7),          # checkpoint 6, after round 2 (step 5): resumes mid-segment
    ("coalora-random", 5, 0, 4),   # killed before round 2 ran: back to checkpoint 3, round 2 redone
    ("lqlora", 5, 1, 4),
])
def test_killed_method_resumes_to_identical_weights(name, kill_step, run_index, first_resumed, tmp_path):
    """A kill mid-run (for lqlora: in the SECOND config's run; for the pool methods: around a search round)
    and a restart end exactly where an uninterrupted run ends, search state included; finished runs are
    loaded, not retrained."""
    method = METHODS[name]
    straight = train_method(method, tiny_setup(), tmp_path / "straight")
    setup = tiny_setup()
    run_name = straight.runs[run_index].name
    with pytest.raises(Killed):
        train_method(method, setup, tmp_path / "killed", on_step=kill_at(kill_step, run_name))
    resumed_steps = []
    resumed = train_method(method, tiny_setup(), tmp_path / "killed",
                           on_step=lambda t: resumed_steps.append((t.desc, t.step)))
    assert resumed_steps[0] == (f"{name} {run_name}", first_resumed)
    assert all(desc.endswith(run_name) for desc, _ in resumed_steps)  # the finished run was not retrained
    for a, b in zip(straight.runs, resumed.runs):
        assert adapters_equal(a.adapter, b.adapter)
        assert a.losses == b.losses and a.eval_after == b.eval_after and a.eval_before == b.eval_before
        assert without_seconds(a.search) == without_seconds(b.search)
    if METHODS[name].has_pool:
        rounds = straight.runs[0].search["rounds"]
        assert len(rounds) == 4 and rounds[2]["proposed"] and rounds[3]["final"] and not rounds[3]["proposed"]


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------

def test_instruct_batches_take_the_loss_on_the_response_only():
    tok = CharTokenizer()
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi there"},
            {"instruction": "Add.", "input": "1 and 2", "output": "3"},
            {"instruction": "x" * 80, "input": "", "output": "cut away"}]  # prompt fills the window: dropped
    table = instruct_table(tok, rows, seq_len=64, batch_size=2)
    assert len(table.input_ids) == 2
    for ids, labels, mask, row in zip(table.input_ids, table.labels, table.attention_mask, rows):
        kept = labels[labels != IGNORE].tolist()
        assert kept == tok([row["output"]])["input_ids"][0] + [tok.eos_token_id]
        assert torch.equal(ids[labels != IGNORE], labels[labels != IGNORE])
        assert int(mask.sum()) == int((ids != tok.pad_token_id).sum())
    with pytest.raises(UserError, match="train.seq_len"):
        instruct_table(tok, rows[2:], seq_len=64, batch_size=2)


def test_instruct_training_lowers_the_response_loss(tmp_path):
    tok = CharTokenizer()
    rows = [{"instruction": "Name an animal.", "input": "", "output": random.Random(i).choice(WORDS[:8])}
            for i in range(30)]
    setup = tiny_setup(data="instruct")
    setup.batches = instruct_table(tok, rows[:26], 64, 4)
    setup.eval_batch = instruct_table(tok, rows[26:], 64, 4).all()
    run = train_method(METHODS["qlora"], setup, tmp_path).runs[0]
    assert run.eval_after[run.name] < run.eval_before[run.name] - 0.05


def test_text_batches_are_a_function_of_the_generator():
    batches = text_batches(CharTokenizer(), tiny_texts(10, 3), 16, 3)
    a = batches.sample(torch.Generator().manual_seed(5))
    b = batches.sample(torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["input_ids"].shape == (3, 16)
    assert torch.equal(a["labels"], a["input_ids"])


# ---------------------------------------------------------------------------------------------------------
# Targets and bad input
# ---------------------------------------------------------------------------------------------------------

def test_target_set_is_the_nearest_pool_config_and_refuses_bad_targets():
    pool = tiny_pool()
    assert [round(c.bits, 1) for c in target_set(pool, [4.0, 2.0 + 0.4])] == [4.3, 2.3]
    with pytest.raises(UserError, match=r"train\.target_bits: \[2\.1\] outside the pool's bits range"):
        target_set(pool, [2.1, 3.0])
    with pytest.raises(UserError, match=r"train\.target_bits: 4\.2 and 4\.4 both select pool config"):
        target_set(pool, [4.2, 4.4])


def test_k_larger_than_the_pool_is_refused_before_training(tmp_path):
    setup = tiny_setup(k=5)
    with pytest.raises(UserError, match=r"train\.k: 5 configs per step, but the pool holds only 4"):
        train_method(METHODS["coalora"], setup, tmp_path)
    assert not list(tmp_path.rglob("step-*"))


def write_project(root: Path, repo_root: Path, **train) -> None:
    """A project whose upstream artifacts (data, base_model, allocate) are tiny but real."""
    from coalora.model.tokenizer import train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    smoke = yaml.safe_load((repo_root / "profiles" / "smoke.yaml").read_text())
    from coalora.params import deep_merge

    raw = deep_merge(raw, smoke)
    raw["train"].update({"methods": ["coalora", "qlora"], "target_bits": [2.3, 4.3], "steps_per_config": 3,
                         "batch_size": 2, "seq_len": 16, "eval_sequences": 2, "checkpoint_every": 2, **train})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    artifacts = root / "artifacts"
    texts = tiny_texts(60, 4)
    write_jsonl(artifacts / "data/text/train.jsonl", [{"text": t, "url": "", "timestamp": ""} for t in texts])
    write_jsonl(artifacts / "data/text/validation.jsonl", [{"text": t, "url": "", "timestamp": ""} for t in texts])
    write_jsonl(artifacts / "data/instruct/train.jsonl",
                [{"instruction": "Say something.", "input": "", "output": t} for t in texts[:30]])
    tokenizer = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(artifacts / "base_model/model")
    tokenizer.save_pretrained(artifacts / "base_model/model")
    write_json(artifacts / "base_model/base.json", {"source": "builtin", "path": "model", "revision": None})
    for config in tiny_pool():
        config.save(artifacts / "allocate/pool" / f"{config.id}.json")
    for config in tiny_unseen():
        config.save(artifacts / "allocate/unseen" / f"{config.id}.json")
    for stage in ("data", "base_model", "allocate"):
        write_json(artifacts / stage / MANIFEST, {"files": build_manifest(artifacts / stage)})


@pytest.fixture
def project(tmp_path, repo_root):
    write_project(tmp_path, repo_root)
    return tmp_path


def test_train_stage_writes_adapters_records_and_equal_budgets(project, capsys):
    from coalora.cli import main

    assert main(["--root", str(project), "stage", "train"]) == 0
    out = project / "artifacts/train"
    targets = [t["id"] for t in read_json(out / "targets.json")["targets"]]
    assert len(targets) == 2
    coalora, qlora = read_json(out / "coalora/train.json"), read_json(out / "qlora/train.json")
    assert (out / "coalora/adapter.safetensors").is_file()
    assert all((out / "qlora" / t / "adapter.safetensors").is_file() for t in targets)
    assert qlora["steps_per_run"] == {t: 3 for t in targets}  # equal steps per configuration
    assert coalora["config_steps"] == qlora["config_steps"] == 6  # equal compute: 3 steps of K = 2, 6 of 1
    assert coalora["steps"] == 3 and qlora["steps"] == 6 and coalora["k"] == 2
    assert sorted(p.stem for p in (out / "coalora/configs").glob("*.json")) == sorted(coalora["config_draws"])
    assert sorted(p.stem for p in (out / "qlora/configs").glob("*.json")) == sorted(targets)
    assert coalora["configs"] == qlora["configs"] == targets
    assert sorted(qlora["config_bits"]) == sorted(targets) and all(2 < b < 9 for b in qlora["config_bits"].values())
    assert (out / "coalora/loss.csv").read_text().splitlines()[0] == "step,run,loss"
    metrics = read_json(out / "metrics.json")
    assert {"coalora.final_loss", "coalora.seconds", "qlora.final_loss", "qlora.seconds"} <= set(metrics)
    from coalora.model.adapter import read_adapter

    tensors, header = read_adapter(out / "coalora/adapter.safetensors")
    assert header["method"] == "coalora" and header["config_ids"] == targets and header["use_confignet"]
    assert any(k.startswith("confignet.") for k in tensors)
    assert not (project / "artifacts/.work/train").exists()  # checkpoints go once the output is in place
    # the search contract: the final pool as config files, the rounds in train.json and rounds.csv
    rounds = coalora["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and [r["step"] for r in rounds] == [0, 1, 2, 3]
    pool_ids = sorted(p.stem for p in (out / "coalora/pool").glob("*.json"))
    assert pool_ids == sorted(p["id"] for p in rounds[-1]["pool"]) and "pool" not in qlora
    assert all(len(r["proposed"]) == 2 for r in rounds[1:3]) and rounds[3]["proposed"] == [] and rounds[3]["final"]
    assert set(rounds[-1]["front"]) <= set(pool_ids)
    unseen = {p.stem for p in (project / "artifacts/allocate/unseen").glob("*.json")}
    assert not unseen & {i for r in rounds for i in r["proposed"]} and not unseen & set(coalora["config_draws"])
    assert {"round", "step", "pool", "front", "hypervolume", "hv_reference", "hv_normalisation", "proposed",
            "seconds"} <= set(rounds[0])
    csv_rows = (out / "coalora/rounds.csv").read_text().splitlines()
    assert csv_rows[0] == "round,id,bits,f1,in_pool,on_front" and len(csv_rows) == 1 + 4 + 6 + 8 + 8


def test_train_stage_on_instruction_data(tmp_path, repo_root):
    from coalora.cli import main

    write_project(tmp_path, repo_root, data="instruct", methods=["shared"], seq_len=64)
    assert main(["--root", str(tmp_path), "stage", "train"]) == 0
    record = read_json(tmp_path / "artifacts/train/shared/train.json")
    assert record["train"]["data"] == "instruct" and record["steps"] == 6
    assert all(0 < v < 20 for v in record["eval_loss_after"].values())


@pytest.mark.parametrize("train, message", [
    ({"methods": ["coalora", "lora"]}, "train.methods.1: Input should be 'coalora', 'coalora-frozen', "
                                       "'coalora-random', 'qlora', 'lqlora', 'shared'"),
    ({"target_bits": [1.5, 3.0]}, "train.target_bits: Value error, [1.5] out of range"),
    ({"target_bits": [2.3, 8.5]}, "train.target_bits: [8.5] above allocate.budget_max (7.25)"),
    ({"target_bits": [2.1, 4.3]}, "train.target_bits: [2.1] outside the pool's bits range"),  # the pool's own
    ({"k": 7}, "train.k: 7 configs per step, but the pool holds at most 4 (allocate.grid_size)"),
    ({"joint_compute": 0.1}, "train.joint_compute: 0.1 × 3 steps × 2 targets gives coalora less than one step"),
    ({"joint_compute": 0.5}, "search.rounds: 2 proposal rounds need at least 3 training steps"),
])
def test_bad_train_input_exits_2_naming_the_field(tmp_path, repo_root, capsys, train, message):
    from coalora.cli import main

    write_project(tmp_path, repo_root, **train)
    assert main(["--root", str(tmp_path), "stage", "train"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "artifacts/train").exists()


def test_checkpoints_made_from_other_params_are_discarded(project, repo_root):
    from coalora.params import load_params
    from coalora.stages.core import StageContext
    from coalora.stages.train import method_work

    params = load_params(project)
    inputs = {name: project / "artifacts" / name for name in ("data", "base_model", "allocate")}
    ctx = StageContext(root=project, out=project / "out", work=project / "work", inputs=inputs, progress=False)
    work = method_work(ctx, params, "coalora")
    (work / "joint" / "step-00000002").mkdir(parents=True)
    assert (method_work(ctx, params, "coalora") / "joint").is_dir()  # same inputs: kept for the resume
    changed = params.model_copy(update={"train": params.train.model_copy(update={"lr": 0.5})})
    assert not (method_work(ctx, changed, "coalora") / "joint").exists()  # other params: discarded
    more = changed.model_copy(update={"train": changed.train.model_copy(update={"methods": ["coalora"]})})
    (work / "joint").mkdir()
    assert (method_work(ctx, more, "coalora") / "joint").is_dir()  # the method list is not an input of a method


def test_adapter_files_are_byte_identical_across_processes(tmp_path):
    """The train stage's output digest must not depend on the process that wrote it (cache keys)."""
    import hashlib
    import subprocess
    import sys

    code = ("import sys, torch; from pathlib import Path; from coalora.model.adapter import write_adapter; "
            "write_adapter(Path(sys.argv[1]), {'a': torch.arange(6.).reshape(2, 3)}, "
            "{'method': 'coalora', 'rank': 4, 'layers': ['x', 'y']})")
    digests = set()
    for i in range(4):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["coalora", "lqlora"])
def test_a_process_started_on_its_own_trains_on_the_gpu_like_on_the_cpu(name, tmp_path, monkeypatch):
    """With a GPU and no launcher, training runs there (COALORA_DEVICE unset): the same losses as on the
    CPU up to float rounding."""
    monkeypatch.setenv("COALORA_DEVICE", "cpu")
    cpu = train_method(METHODS[name], tiny_setup(), tmp_path / "cpu").runs[0]
    monkeypatch.delenv("COALORA_DEVICE")
    gpu = train_method(METHODS[name], tiny_setup(), tmp_path / "gpu").runs[0]
    assert gpu.steps == cpu.steps
    assert [b for _, b in gpu.losses] == pytest.approx([b for _, b in cpu.losses], rel=1e-3, abs=1e-4)


def test_the_compute_device_is_the_cpu_here_and_a_bad_choice_is_refused(monkeypatch):
    from coalora.parallel import compute_device

    monkeypatch.delenv("COALORA_DEVICE", raising=False)
    assert compute_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("COALORA_DEVICE", "tpu9")
    with pytest.raises(UserError, match="COALORA_DEVICE: 'tpu9' is not a device"):
        compute_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("COALORA_DEVICE", "cuda")
        with pytest.raises(UserError, match="torch sees no CUDA device"):
            compute_device()
