"""The application layer: reproducible runs, configs as files, one resume rule, run folders that
never write through a symlink, load_run of every kind of folder, and the objective registry."""

import os
from pathlib import Path

import _torchrun
import pytest
import safetensors.torch
import torch

import flowmatch
from flowmatch.app.config import read_config_file, with_overrides
from flowmatch.app.objectives import OBJECTIVES, OPTIONAL_SETTINGS
from flowmatch.app.presets import PRESETS, preset_config
from flowmatch.cli.main import main
from flowmatch.training import TrainConfig, latest_checkpoint, load_checkpoint, train

TINY = ["model.hidden=16", "model.depth=2", "train.batch_size=32", "train.log_every=5"]


def _train(out: Path, *extra: str, steps: int = 10) -> None:
    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", str(steps)]
    assert main([*argv, *TINY, "train.checkpoint_every=5", *extra]) == 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(latest_checkpoint(run)))


def test_the_same_command_twice_gives_bit_identical_checkpoints(tmp_path):
    _train(tmp_path / "a")
    _train(tmp_path / "b")
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()  # initial weights, stream, optimizer: every bit
    _train(tmp_path / "c", "train.seed=1")
    first, other = _weights(tmp_path / "a"), _weights(tmp_path / "c")
    assert not torch.equal(first["model/input.weight"], other["model/input.weight"])


def test_two_processes_give_the_single_process_weights(tmp_path):
    # The same command under torchrun (gloo, 2 processes); the micro-batch size is fixed so both
    # draw the same stream, and the seed alone fixes the initial weights (no init_from).
    args = ["--preset", "gmm", "--max-steps", "10", *TINY, "train.micro_batch_size=16"]
    args += ["train.num_threads=1", "train.device=cpu"]
    assert main(["train", "--out", str(tmp_path / "one"), *args]) == 0
    command = ["--standalone", "--nproc_per_node=2", "-m", "flowmatch", "train"]
    _torchrun.finish(_torchrun.start([*command, "--out", str(tmp_path / "two"), *args]), 180)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:  # float32: the all-reduce sums the two halves in another order
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_runs_config_json_is_a_config_file_and_resume_alone_continues_it(tmp_path, capsys):
    _train(tmp_path / "a", steps=5)
    saved = read_config_file(tmp_path / "a" / "config.json")
    assert saved.train.steps == 5 and saved.model.hidden == 16
    argv = ["train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    assert _weights(tmp_path / "a").keys() == _weights(tmp_path / "b").keys()
    assert (
        latest_checkpoint(tmp_path / "a").read_bytes()
        == latest_checkpoint(tmp_path / "b").read_bytes()
    )
    # --resume RUN alone continues from the stored config; a longer schedule is another run.
    assert main(["train", "--resume", str(tmp_path / "a"), "train.log_every=1"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "a"), "train.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.lr: 0.002 there, 0.5 here" in err and len(err.splitlines()) == 1


def test_load_run_reads_run_export_and_library_folders(tmp_path):
    _train(tmp_path / "run", steps=5)
    run = flowmatch.load_run(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    exported = flowmatch.load_run(tmp_path / "export")
    assert exported.step == run.step == 5
    for key, value in run.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[key], value)
    # A folder written by flowmatch.training.train with the user's own network.
    from _train_worker import CondOTObjective, GaussianSource, TinyVelocity

    net = TinyVelocity()
    cfg = TrainConfig(steps=3, batch_size=8, log_every=1, checkpoint_every=3)
    train(net, CondOTObjective(), GaussianSource(torch.zeros(2)), cfg, tmp_path / "lib")
    with pytest.raises(flowmatch.training.CheckpointError, match="model=net"):
        flowmatch.load_run(tmp_path / "lib")
    loaded = flowmatch.load_run(tmp_path / "lib", model=TinyVelocity())
    assert loaded.step == 3 and loaded.config.train.steps == 3


def test_writes_replace_a_symlink_instead_of_following_it(tmp_path, capsys):
    _train(tmp_path / "run", steps=5)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name in ("samples.npz", "samples.png", "spec.json", "loss.png", "eval-euler-2.json"):
        link = tmp_path / "run" / name
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
    assert main(["train", "--resume", str(tmp_path / "run"), "train.log_every=1"]) == 0
    assert main(["sample", str(tmp_path / "run"), "--n", "20", "--solver", "euler"]) == 0
    assert main(["eval", str(tmp_path / "run"), "--solver", "euler", "--steps", "2", "--n", "20",
                 "--no-nll"]) == 0  # fmt: skip
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "run" / "samples.npz").is_symlink()


def test_reads_refuse_fifos_devices_and_links_out_of_the_folder(tmp_path, capsys):
    _train(tmp_path / "run", steps=5)
    checkpoint = latest_checkpoint(tmp_path / "run")
    checkpoint.unlink()
    os.mkfifo(checkpoint)  # would block a plain read forever
    assert main(["sample", str(tmp_path / "run"), "--n", "4"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    checkpoint.unlink()
    checkpoint.symlink_to("/dev/zero")
    assert main(["sample", str(tmp_path / "run"), "--n", "4"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    spec = tmp_path / "run" / "spec.json"
    outside = tmp_path / "outside.json"
    outside.write_text(spec.read_text())
    spec.unlink()
    spec.symlink_to(outside)
    assert main(["sample", str(tmp_path / "run"), "--n", "4"]) == 2
    assert "leads out of" in capsys.readouterr().err


def test_every_objective_is_one_registry_entry_the_cli_reads(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in OBJECTIVES)
    for name, entry in OBJECTIVES.items():
        assert entry.network in ("velocity", "flow_map") and entry.description
        if not entry.teacher:  # every objective without a teacher builds from a preset
            base = preset_config("checkerboard-flowmap" if entry.is_flow_map else "checkerboard")
            config = with_overrides(base, [f"objective={name}"])
            from flowmatch.app.build import build_objective

            objective = build_objective(config)
            assert callable(objective), name
    for preset in PRESETS.values():
        assert preset.build().objective.name in OBJECTIVES


# a value other than the default of each key that only some objectives read
CHANGED = {
    "diagonal_fraction": "0.25",
    "both_orders": "true",
    "learned_weight": "true",
    "adaptive_power": "1",
}


def _loss_and_state(config, teacher):
    """The objective's loss at a fixed batch, draws and network, and its state's keys."""
    from flowmatch.app.build import DataSpec, build_model, build_objective

    torch.manual_seed(0)
    model = build_model(config, DataSpec((2,)))
    with torch.no_grad():  # not the initial map (its last layer is zero: X = identity)
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    objective = build_objective(config, teacher)
    generator = torch.Generator().manual_seed(0)
    batch = {"x1": torch.randn(64, 2, generator=generator)}
    loss = objective(model, batch, 10**6, generator).mean().item()
    return loss, sorted(objective.state_dict())


@pytest.mark.parametrize("key", OPTIONAL_SETTINGS)
def test_an_objective_reads_the_settings_its_entry_names_and_refuses_the_others(
    key, tmp_path, capsys
):
    def teacher(x, t, **kw):
        return -x

    for name, entry in OBJECTIVES.items():
        preset = "checkerboard-flowmap" if entry.is_flow_map else "checkerboard"
        if key not in entry.settings:  # one line, exit 2, nothing written
            argv = ["train", "--preset", preset, "--out", str(tmp_path / name)]
            assert main([*argv, f"objective={name}", f"objective.{key}={CHANGED[key]}"]) == 2
            err = capsys.readouterr().err.strip()
            assert f"objective.{key} applies to objective=" in err, err
            assert f"not to name={name}" in err and len(err.splitlines()) == 1
            assert not (tmp_path / name).exists()
            continue
        # a distillation's teacher folder is not opened here: its velocity is passed
        named = [f"objective={name}"] + ([f"objective.teacher={tmp_path}"] if entry.teacher else [])
        plain = with_overrides(preset_config(preset), named)
        changed = with_overrides(plain, [f"objective.{key}={CHANGED[key]}"])
        assert _loss_and_state(changed, teacher) != _loss_and_state(plain, teacher), name


def test_prefetching_the_next_batches_changes_no_bit(tmp_path):
    # The data draw and exact-OT coupling of step k + 1 run in a background thread while step
    # k trains: every tensor of the checkpoint (weights, EMA, optimizer moments) must be the
    # plain loop's, bit for bit (only the recorded train.prefetch differs).
    for prefetch in ("false", "true"):
        _train(tmp_path / prefetch, "path.coupling=exact-ot", f"train.prefetch={prefetch}")
    plain, prefetched = _weights(tmp_path / "false"), _weights(tmp_path / "true")
    assert plain.keys() == prefetched.keys()
    assert all(torch.equal(plain[k], prefetched[k]) for k in plain)
    assert load_checkpoint(latest_checkpoint(tmp_path / "true")).config["train"]["prefetch"]
