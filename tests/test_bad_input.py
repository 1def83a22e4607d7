"""Bad invocations of every command: each is one line on stderr, exit status 2, no traceback and
nothing written (a train command's run folder is not even created)."""

import pytest

from flowmatch.cli.main import main

TINY = ["model.hidden=16", "model.depth=2", "train.batch_size=32", "train.log_every=5"]

BAD_VALUES = {
    "path.sigma_min": ["-1", "2", "1", "nan", "inf", "x"],
    "path.schedule": ["nope", "1"],
    "path.coupling": ["magic"],
    "path.ot_block_size": ["0", "-4", "8"],  # 8: only with coupling=exact-ot
    "path.time_sampler": ["gauss"],
    "model.kind": ["cnn", "unet"],  # unet does not fit 2-D data
    "model.hidden": ["0", "-3", "1e9", "abc", "2.5"],
    "model.depth": ["0", "-1", "1e6"],
    "model.activation": ["sigmoidal"],
    "model.dropout": ["nan", "1", "-0.1"],
    "model.num_heads": ["0"],
    "model.channel_mult": ["", "0,1", "a,b"],
    "model.num_groups": ["0"],
    "model.num_res_blocks": ["0"],
    "objective": ["magic", "lmd", "emd", "pfmm", "reflow"],  # the last four need a teacher
    "objective.label_dropout": ["1", "-0.5", "nan"],
    "objective.diagonal_fraction": ["1", "2", "-1"],
    "objective.teacher_solver": ["leapfrog"],
    "objective.teacher_steps": ["0"],
    "objective.reflow_pairs": ["0", "1e12"],
    "objective.warm_start": ["true", "maybe"],
    "objective.teacher_guidance": ["2"],
    "objective.teacher": ["/tmp"],
    "objective.target_ema": ["0.99", "1", "-0.1", "nan"],  # 0.99: the preset's fm takes none
    "data": ["nowhere"],
    "data.conditional": ["true", "perhaps"],
    "data.val_fraction": ["1", "-0.1", "nan"],
    "eval.samples": ["-5", "0", "1e30"],
    "eval.solver": ["leapfrog", "flow_map"],
    "eval.steps": ["0", "-2"],
    "eval.nll_samples": ["0"],
    "train.seed": ["1e30", "-1", "1.5", "x"],
    "train.steps": ["0", "-10", "1e30"],
    "train.batch_size": ["0", "1e12", "-1"],
    "train.micro_batch_size": ["0", "7"],  # 7 does not divide 32
    "train.lr": ["0", "-1", "inf", "nan", "fast"],
    "train.eps": ["inf", "0", "nan"],
    "train.weight_decay": ["-1", "inf"],
    "train.betas": ["0.9", "0.9,1.0", "1,2,3", "x,y"],
    "train.warmup_steps": ["-1", "1e9"],
    "train.lr_schedule": ["linear"],
    "train.grad_clip": ["0", "-1", "inf"],
    "train.ema_decay": ["1", "-0.1", "nan"],
    "train.ema_warmup": ["sometimes"],
    "train.precision": ["fp8"],
    "train.log_every": ["0"],
    "train.checkpoint_every": ["0"],
    "train.keep_checkpoints": ["0"],
    "train.val_every": ["0"],
    "train.device": ["bogus", "cuda", "cuda:7", "mps"],
    "train.num_threads": ["0", "-2"],
    "train.nope": ["1"],
    "nope.key": ["1"],
    "model": ["3"],
    "model.hidden.deeper": ["3"],
}
TRAIN_OVERRIDES = [f"{key}={value}" for key, values in BAD_VALUES.items() for value in values]
UNET_OVERRIDES = [
    "model.num_heads=3",  # does not divide 32 channels
    "model.num_groups=7",
    "model.num_head_channels=0",
    "model.num_head_channels=5",
    "model.channels=0",
    "model.kind=mlp",
    "data=mnist",  # needs data.path
    "data.path=/nonexistent/mnist",
]
FLOW_MAP_OVERRIDES = [
    "objective.target_ema=1",
    "objective.target_ema=0.9 train.parallel=fsdp",  # the EMA copy is a whole network
    "objective.time_derivative=finite_difference train.precision=bf16",  # below bf16's resolution
    "train.parallel=fsdp",  # tvm's default rate, 0.99
]
TRAIN_ARGUMENTS = [
    [],  # neither --preset, --config nor --resume
    ["--preset", "nope"],
    ["--preset", "gmm", "--max-steps", "0"],
    ["--preset", "gmm", "--max-steps", "-3"],
    ["--preset", "gmm", "--max-steps", "many"],
    ["--preset", "gmm", "--config", "c.json"],
    ["--config", "/nonexistent/config.json"],
    ["--resume", "/nonexistent/run"],
    ["--preset", "gmm", "lonely"],
    ["--preset", "gmm", "--unknown-flag"],
]


def _one_line_error(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses before main's own checks
        code = exit_.code
    out = capsys.readouterr()
    assert code == 2, (argv, out.err)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, (argv, out.err)
    return lines[0]


@pytest.mark.parametrize("override", TRAIN_OVERRIDES)
def test_bad_train_value(override, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", "2", *TINY, override]
    _one_line_error(capsys, argv)
    assert not out.exists()


@pytest.mark.parametrize("override", UNET_OVERRIDES)
def test_bad_unet_value(override, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "digits", "--out", str(out), "--max-steps", "1", override]
    _one_line_error(capsys, argv)
    assert not out.exists()


@pytest.mark.parametrize("overrides", FLOW_MAP_OVERRIDES)
def test_bad_tvm_value(overrides, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", "2", *TINY]
    _one_line_error(capsys, [*argv, "objective=tvm", *overrides.split()])
    assert not out.exists()


@pytest.mark.parametrize("arguments", TRAIN_ARGUMENTS, ids=map(repr, TRAIN_ARGUMENTS))
def test_bad_train_arguments(arguments, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, ["train", *arguments])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "content", [b"\xff\xfe\x00binary", b"[1, 2]", b"{", b'{"nope": 1}', b'{"train": {"lr": -1}}']
)
def test_bad_config_file(content, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_bytes(content)
    line = _one_line_error(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")])
    assert "config.json" in line
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    velocity, flow_map = root / "gmm", root / "gmm-flowmap"
    base = ["--max-steps", "4", *TINY]
    assert main(["train", "--preset", "gmm", "--out", str(velocity), *base]) == 0
    assert main(["train", "--preset", "gmm-flowmap", "--out", str(flow_map), *base]) == 0
    return {"velocity": velocity, "flow_map": flow_map, "file": root / "gmm" / "spec.json"}


SAMPLE_ARGUMENTS = [
    ("velocity", ["--n", "0"]),
    ("velocity", ["--n", "-1"]),
    ("velocity", ["--n", "many"]),
    ("velocity", ["--guidance", "nan"]),
    ("velocity", ["--guidance", "inf"]),
    ("velocity", ["--guidance", "2"]),  # not a conditional run
    ("velocity", ["--steps", "0", "--solver", "euler"]),
    ("velocity", ["--steps", "-1", "--solver", "rk4"]),
    ("velocity", ["--steps", "4", "--solver", "dopri5"]),
    ("velocity", ["--solver", "flow_map"]),
    ("velocity", ["--solver", "leapfrog"]),
    ("flow_map", ["--steps", "0"]),
    ("flow_map", ["--guidance", "2"]),
    ("missing", []),
    ("file", []),
]


@pytest.mark.parametrize(("run", "arguments"), SAMPLE_ARGUMENTS)
def test_bad_sample_arguments(runs, run, arguments, capsys):
    folder = runs.get(run, runs["velocity"].parent / "missing")
    before = sorted(p.name for p in runs["velocity"].iterdir())
    _one_line_error(capsys, ["sample", str(folder), *arguments])
    assert sorted(p.name for p in runs["velocity"].iterdir()) == before


EVAL_ARGUMENTS = [
    ("velocity", ["--n", "-5"]),
    ("velocity", ["--n", "0"]),
    ("velocity", ["--steps", "0"]),
    ("velocity", ["--steps", "1,x"]),
    ("velocity", ["--solver", "dopri5", "--steps", "2"]),
    ("velocity", ["--solver", "flow_map"]),
    ("velocity", ["--guidance", "3"]),
    ("velocity", ["--inception-weights", "/nonexistent.pth"]),
    ("flow_map", ["--guidance", "nan"]),
    ("missing", []),
]


@pytest.mark.parametrize(("run", "arguments"), EVAL_ARGUMENTS)
def test_bad_eval_arguments(runs, run, arguments, capsys):
    folder = runs.get(run, runs["velocity"].parent / "missing")
    before = sorted(p.name for p in runs["velocity"].iterdir())
    _one_line_error(capsys, ["eval", str(folder), "--no-nll", *arguments])
    assert sorted(p.name for p in runs["velocity"].iterdir()) == before


@pytest.mark.parametrize(
    "arguments",
    [
        ["--teacher", "/nonexistent", "--objective", "lmd"],
        ["--teacher", "FLOW_MAP", "--objective", "lmd"],
        ["--teacher", "VELOCITY", "--objective", "lsd"],
        ["--teacher", "VELOCITY", "--objective", "lmd", "model.hidden=0"],
        ["--teacher", "VELOCITY", "--objective", "lmd", "--max-steps", "0"],
        ["--teacher", "VELOCITY", "--objective", "lmd", "objective.reflow_pairs=0"],
    ],
)
def test_bad_distill_arguments(runs, arguments, tmp_path, capsys):
    arguments = [
        {"FLOW_MAP": str(runs["flow_map"]), "VELOCITY": str(runs["velocity"])}.get(a, a)
        for a in arguments
    ]
    _one_line_error(capsys, ["distill", *arguments, "--out", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()


def test_bad_export_arguments(runs, tmp_path, capsys):
    _one_line_error(capsys, ["export", str(tmp_path / "missing")])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, ["export", str(runs["velocity"]), "--out", str(blocker / "sub")])
