"""Bad input gives one line naming the key or path and what is allowed, exit status 2, nothing written: params
files (encoding, duplicate keys, profiles), cross-field rules before any stage, read-only projects, an
unreachable Dask scheduler."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coalora.errors import ParamsError, UserError
from coalora.params import dump_params, load_params

COALORA = str(Path(sys.executable).parent / "coalora")


@pytest.fixture
def project(tmp_path, repo_root) -> Path:
    """params.yaml (the repository's) and profiles/smoke.yaml in a fresh folder."""
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "profiles").mkdir()
    shutil.copy(repo_root / "profiles" / "smoke.yaml", tmp_path / "profiles" / "smoke.yaml")
    return tmp_path


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _cli(root: Path, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([COALORA, "--root", str(root), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600, **kwargs)


def _one_line_exit_2(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("coalora: error:")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def _edit(path: Path, dotted: str, value) -> None:
    raw = yaml.safe_load(path.read_text())
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


# ---- params files --------------------------------------------------------------------------------------------

def test_non_utf8_params_name_the_file_and_line(project):
    text = (project / "params.yaml").read_bytes()
    (project / "params.yaml").write_bytes(text.replace(b"seed: 1234", b"seed: 1234 # \xff\xfe caf\xe9", 1))
    line = text[: text.index(b"seed: 1234")].count(b"\n") + 1
    with pytest.raises(ParamsError, match=rf"params\.yaml: line {line}: byte 0xff is not UTF-8 text"):
        load_params(project)
    _one_line_exit_2(_cli(project, "params"), "is not UTF-8 text")


def test_duplicate_key_is_rejected(project):
    lines = (project / "params.yaml").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("lr:"))
    lines.insert(at + 1, lines[at].replace("0.005", "0.5"))  # model.builtin.lr twice, the second would win
    (project / "params.yaml").write_text("".join(lines))
    with pytest.raises(ParamsError, match=r"duplicate key 'lr' \(first at line \d+\); each key may appear once"):
        load_params(project)


@pytest.mark.parametrize("name", ["../params", "/etc/passwd", "smoke/../smoke", ".hidden", ""])
def test_profile_must_name_a_file_in_profiles(project, name):
    if name:
        with pytest.raises(ParamsError, match="is not a profile name; give the name of a file in profiles/"):
            load_params(project, name)
    else:
        assert load_params(project, name) == load_params(project)  # empty: no profile


def test_params_yaml_must_be_valid_on_its_own_under_a_profile(project):
    _edit(project / "params.yaml", "world.n_entities", 3)        # invalid alone
    _edit(project / "profiles" / "smoke.yaml", "world.n_entities", 16)  # the profile hides it
    with pytest.raises(ParamsError, match=r"params\.yaml \(valid on its own, whatever profiles/smoke\.yaml "
                                          r"overrides\): world\.n_entities"):
        load_params(project, "smoke")


def test_cross_field_rule_broken_only_in_params_yaml_is_reported_under_a_profile(project):
    _edit(project / "params.yaml", "allocate.budget_max", 3.0)  # below train.target_bits 3.5, 4.0 of params.yaml
    _edit(project / "profiles" / "smoke.yaml", "allocate.budget_max", 7.25)
    result = _cli(project, "--profile", "smoke", "params")
    _one_line_exit_2(result, "params.yaml (on its own, whatever profiles/smoke.yaml overrides): train.target_bits: "
                             "[3.5, 4.0] above allocate.budget_max (3.0)")


# ---- cross-field rules ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edits, message", [
    ({"allocate.budget_max": 3.0}, "train.target_bits: [3.5, 4.0] above allocate.budget_max (3.0)"),
    ({"train.k": 120}, "train.k: 120 configs per step, but the pool holds at most 50 (allocate.grid_size)"),
    ({"train.joint_compute": 0.01}, "search.rounds: 4 proposal rounds need at least 5 training steps"),
    ({"train.data": "instruct", "search.f1_sequences": 99},
     "search.f1_sequences: 99 rows, but instruction data holds out only train.eval_sequences"),
])
def test_cross_field_rules_fail_coalora_params(project, capsys, edits, message):
    from coalora.cli import main

    for dotted, value in edits.items():
        _edit(project / "params.yaml", dotted, value)
    before = _listing(project)
    assert main(["--root", str(project), "params"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("coalora: error:") == 1
    assert main(["--root", str(project), "stage", "data"]) == 2  # before any stage, even one not reading them
    assert _listing(project) == before


def test_cross_field_rules_are_a_list_to_extend(project, monkeypatch):
    from coalora import checks

    monkeypatch.setattr(checks, "PARAMS_CHECKS", [*checks.PARAMS_CHECKS,
                                                  lambda p: ["report.serve_k: odd"] if p.report.serve_k % 2 else []])
    _edit(project / "params.yaml", "report.serve_k", 3)
    with pytest.raises(ParamsError, match=r"params\.yaml: report\.serve_k: odd"):
        checks.load_checked(project, None)


def test_target_module_matching_nothing_is_named_before_any_stage(project):
    _edit(project / "params.yaml", "quant.target_modules", ["q_proj", "qq_proj", "down_proj"])
    before = _listing(project)
    result = _cli(project, "--profile", "smoke", "run", "--no-track")
    _one_line_exit_2(result, "quant.target_modules: 'qq_proj' matches no linear layer inside the blocks "
                             "'model.layers.N'; linear layers there end in: down_proj, gate_proj, k_proj")
    assert _listing(project) == before  # no stage ran, no state folder


def test_quantized_layers_name_every_entry_that_matches_nothing():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from coalora.space import quantized_layers

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    assert len(quantized_layers(model, ["q_proj", r"model\.layers\.1\..*_proj"])) == 1 + 7
    with pytest.raises(UserError, match=r"quant\.target_modules: 'qq_proj', 'lm_head' match no linear layer"):
        quantized_layers(model, ["q_proj", "qq_proj", "lm_head"])


# ---- Dask -------------------------------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address, message", [
    ("tcp://127.0.0.1:{port}", "--dask-address: no Dask scheduler answers at tcp://127.0.0.1:{port}"),
    ("127.0.0.1:{port}", "--dask-address: no Dask scheduler answers at 127.0.0.1:{port}"),
    ("tcp://nowhere", "--dask-address: 'tcp://nowhere' is not a scheduler address; give tcp://HOST:PORT"),
])
def test_unreachable_dask_address_is_one_line(project, capsys, address, message):
    from coalora.cli import main

    port = _closed_port()
    before = _listing(project)
    assert main(["--root", str(project), "--profile", "smoke", "run", "--no-track",
                 "--dask-address", address.format(port=port)]) == 2
    err = capsys.readouterr().err
    assert message.format(port=port) in err and "Traceback" not in err
    assert _listing(project) == before


# ---- read-only projects ----------------------------------------------------------------------------------------

def _read_only(target: Path, argv: list[str]) -> list[str]:
    """``argv`` run with ``target`` (and all below it) read-only. As root, which ignores permission bits, the
    command runs in its own mount namespace with ``target`` bind-mounted read-only (a read-only file system);
    otherwise the folder's write bits are cleared."""
    if os.geteuid() != 0:
        for path in [target, *target.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return argv
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode:
        pytest.skip("running as root without mount namespaces: cannot make a folder read-only")
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(target), *argv]


@pytest.fixture
def smoke_project(tmp_path, repo_root) -> Path:
    """A smoke project with a built data stage (a second to build)."""
    from coalora.cli import main

    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(dump_params(load_params(repo_root, "smoke")))
    assert main(["--root", str(root), "stage", "data"]) == 0
    yield root
    for path in [root, *root.rglob("*")]:  # writable again, for pytest's clean-up
        path.chmod(path.stat().st_mode | 0o200)


@pytest.mark.parametrize("target, command", [
    (".", ("stage", "data", "--force")),
    ("artifacts", ("stage", "data", "--force")),
    ("artifacts/data", ("stage", "data", "--force")),
    ("artifacts/.work", ("stage", "data", "--force")),
    (".coalora", ("run", "--no-track")),
    ("artifacts/data", ("run", "--no-track", "--stages", "data,base_model")),
])
def test_read_only_folders_are_one_line(smoke_project, target, command):
    root = smoke_project
    (root / "artifacts" / ".work").mkdir(exist_ok=True)
    (root / ".coalora").mkdir(exist_ok=True)
    argv = _read_only(root / target, [COALORA, "--root", str(root), *command])
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    _one_line_exit_2(result, "is not writable", str((root / target).resolve()))
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing written


def test_write_error_inside_a_stage_is_a_user_error(tmp_path, repo_root):
    """A folder that turns read-only while a stage runs (or a full disk): one line naming the path, and a
    UserError, so the orchestrator does not retry it."""
    from coalora.stages.core import Stage, run_stage

    def full_disk(params, ctx):
        raise OSError(28, "No space left on device", str(ctx.out / "big.bin"))

    params = load_params(repo_root, "smoke")
    with pytest.raises(UserError, match=r"stage disk: .*big\.bin: No space left on device; free some space"):
        run_stage(Stage("disk", full_disk, params=("seed",)), params, tmp_path)
    assert not (tmp_path / "artifacts" / "disk").exists()


@pytest.mark.slow
def test_error_inside_a_stage_under_coalora_run_is_one_line(smoke_project):
    """A UserError raised inside a stage while the Prefect flow runs: main's one line, no Prefect report or
    traceback, exit 2, no retry; ``-v`` shows the details."""
    _edit(smoke_project / "params.yaml", "data.source", "hub")
    # the first dataset the hub source loads (the pretraining text), pointed at a folder that is not there
    _edit(smoke_project / "params.yaml", "data.c4_pretrain.path", str(smoke_project / "no-such-c4"))
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    result = _cli(smoke_project, "run", "--no-track", "--stages", "data", env=env)
    _one_line_exit_2(result, "data.c4_pretrain:")
    assert "Failed(" not in result.stderr and "prefect" not in result.stderr.lower()
    assert result.stderr.count("stage data: running") == 1  # not retried
    verbose = _cli(smoke_project, "-v", "run", "--no-track", "--stages", "data", env=env)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
