"""Conditioning on a context vector: embeddings, networks, dropout and guidance, objectives,
condition-aware OT with dropped contexts, and the gaussian-context preset end to end."""

import json

import numpy as np
import pytest
import torch

from flowmatch.app.build import DataSpec
from flowmatch.app.config import PathConfig
from flowmatch.app.evaluation import context_quality, generate
from flowmatch.app.runs import load_run
from flowmatch.cli.main import main
from flowmatch.couplings import ExactOTCoupling
from flowmatch.data.contextual import ContextGaussian, ContextSource
from flowmatch.losses.flow_matching import FlowMatchingObjective
from flowmatch.nets import MLP, ContextEmbedding, GuidedVelocity, UNet, drop_context
from flowmatch.paths import AffinePath, CondOTSchedule
from flowmatch.training.config import ConfigError

TINY = ["model.hidden=64", "model.depth=3", "train.batch_size=256", "train.log_every=100"]


def test_context_embedding_uses_the_null_row_for_nan_contexts():
    torch.manual_seed(0)
    embed = ContextEmbedding(3, 8)
    with torch.no_grad():
        embed.null.fill_(7.0)
    c = torch.randn(4, 3)
    c[1] = float("nan")
    out = embed(c)
    assert torch.equal(out[1], torch.full((8,), 7.0))
    assert torch.allclose(out[[0, 2, 3]], embed.net(c[[0, 2, 3]]))
    with pytest.raises(ValueError, match=r"context must be \[batch, 3\]"):
        embed(torch.randn(4, 2))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_networks_depend_on_the_context_and_require_it(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net = MLP(2, hidden=16, depth=2, context_dim=2)
        x = torch.randn(3, 2)
    else:
        net = UNet(
            1,
            8,
            channel_mult=(1,),
            num_res_blocks=1,
            attention_resolutions=(),
            image_size=8,
            num_groups=4,
            context_dim=2,
        )
        with torch.no_grad():  # the zero-initialised output convolutions
            for p in net.parameters():
                if not p.any():
                    p.normal_(0.0, 0.1)
        x = torch.randn(3, 1, 8, 8)
    t = torch.rand(3)
    a = net(x, t, context=torch.zeros(3, 2))
    b = net(x, t, context=torch.ones(3, 2))
    assert not torch.allclose(a, b)
    assert torch.equal(net(x, t, context=torch.zeros(3, 2)), a)
    with pytest.raises(ValueError, match="pass context"):
        net(x, t)
    plain = MLP(2, hidden=16, depth=2)
    with pytest.raises(ValueError, match="takes no context"):
        plain(torch.randn(3, 2), t, context=torch.zeros(3, 2))


def test_drop_context_and_guidance_on_contexts():
    c = torch.randn(10000, 2)
    dropped = drop_context(c, 0.3, torch.Generator().manual_seed(0))
    missing = dropped.isnan().any(1)
    assert abs(float(missing.float().mean()) - 0.3) < 0.02
    assert dropped.isnan().all(1).equal(missing)  # whole rows
    assert torch.equal(dropped[~missing], c[~missing])
    assert torch.equal(
        drop_context(c, 0.3, torch.Generator().manual_seed(0)).isnan(), dropped.isnan()
    )

    torch.manual_seed(1)
    net = MLP(2, hidden=16, depth=2, context_dim=2)
    x, t, ctx = torch.randn(5, 2), torch.rand(5), torch.randn(5, 2)
    cond = net(x, t, context=ctx)
    uncond = net(x, t, context=torch.full_like(ctx, float("nan")))
    for w in (0.0, 1.0, 3.0):
        guided = GuidedVelocity(net, w, on="context")(x, t, context=ctx)
        assert torch.allclose(guided, uncond + w * (cond - uncond), atol=1e-5)


def test_objective_passes_the_context_to_model_and_coupling():
    seen = {}

    def spy(x0, x1, generator=None, condition=None):
        seen["coupling"] = condition
        return x0

    def model(x, t, context=None):
        seen["model"] = context
        return torch.zeros_like(x)

    context = torch.randn(6, 2)
    batch = {"x1": torch.randn(6, 2), "context": context}
    FlowMatchingObjective(AffinePath(CondOTSchedule()), coupling=spy)(model, batch, step=0)
    assert seen["model"] is context and seen["coupling"] is context
    plain = FlowMatchingObjective(AffinePath(CondOTSchedule()), coupling=spy, condition_aware=False)
    plain(model, batch, step=0)
    assert seen["model"] is context and seen["coupling"] is None


def test_dropped_contexts_pair_among_themselves():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g)
    context = torch.randn(40, 2, generator=g)
    context[::3] = float("nan")
    perm = torch.cdist(ExactOTCoupling()(x0, x1, condition=context), x0).argmin(1)
    assert sorted(perm.tolist()) == list(range(40))
    missing = context.isnan().any(1)
    assert torch.equal(missing[perm], missing)
    # The dropped rows get plain OT among themselves.
    rows = missing.nonzero().squeeze(1)
    own = rows[torch.cdist(ExactOTCoupling()(x0[rows], x1[rows]), x0[rows]).argmin(1)]
    assert torch.equal(perm[rows], own)


def test_context_source_and_target():
    target = ContextGaussian()
    batch = ContextSource(target, 0.5).sample(4000, torch.Generator().manual_seed(0))
    kept = ~batch["context"].isnan().any(1)
    assert 0.45 < float(kept.float().mean()) < 0.55
    residual = batch["x1"][kept] - batch["context"][kept]
    assert residual.mean(0).abs().max() < 0.02 and abs(float(residual.std()) - 0.25) < 0.01


def test_spec_and_config_checks():
    spec = DataSpec((2,), context_dim=2)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    assert DataSpec.from_dict({"shape": [2]}).context_dim is None
    with pytest.raises(ValueError, match="context_dim"):
        DataSpec.from_dict({"shape": [2], "context_dim": 0})
    with pytest.raises(ConfigError, match="condition_weight"):
        PathConfig(coupling="exact-ot", condition_weight=-1.0)
    for key, value in (("condition_aware", False), ("condition_weight", 5.0)):
        with pytest.raises(ConfigError, match=f"{key} applies to the OT couplings"):
            PathConfig(**{key: value})
        PathConfig(coupling="sinkhorn", **{key: value})


@pytest.fixture(scope="module")
def context_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gc"
    argv = ["train", "--preset", "gaussian-context", "--out", str(out), "--max-steps", "400"]
    assert main([*argv, *TINY]) == 0
    return out


def test_samples_follow_the_context(context_run, tmp_path):
    run = load_run(context_run)
    assert run.spec.context_dim == 2
    target = ContextGaussian()
    for c in ([1.0, -1.0], [-1.5, 1.0]):
        quality = context_quality(run, target, torch.tensor(c), "euler", 8, 1000)
        assert quality.mean_error < 0.12, quality  # ignoring the context: about |c| >= 1.4
        assert 0.15 < quality.std < 0.35, quality
        assert quality.w2 < 3 * quality.w2_noise, quality
    # --context FILE: one row for all samples, or one per sample.
    path = tmp_path / "c.npy"
    np.save(path, np.array([[1.0, 1.0], [-1.0, -1.0]]).repeat(200, 0))
    out = tmp_path / "s.npz"
    argv = ["sample", str(context_run), "--n", "400", "--solver", "euler", "--steps", "8"]
    assert main([*argv, "--context", str(path), "--out", str(out)]) == 0
    x = np.load(out)["samples"]
    assert np.abs(x[:200].mean(0) - 1).max() < 0.15 and np.abs(x[200:].mean(0) + 1).max() < 0.15

    # Guidance on contexts: 1 is the conditional model, 0 the unconditional (the marginal: mean
    # 0, spread about 1.2 against 0.25 given the context), 2 pushes past the context.
    def guided(w):
        return generate(run, 500, method="euler", steps=8, guidance=w, contexts=torch.ones(2)).x

    plain = generate(run, 500, method="euler", steps=8, contexts=torch.ones(2)).x
    assert torch.allclose(guided(1.0), plain, atol=1e-5)
    unconditional = guided(0.0)
    assert unconditional.mean(0).abs().max() < 0.2 and unconditional.std(0).min() > 0.5
    assert (guided(2.0).mean(0) > 1.1).all()


def test_eval_reports_per_context_rows(context_run, capsys):
    argv = ["eval", str(context_run), "--solver", "euler", "--steps", "1,8", "--n", "300", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["per_context"]
    assert [r["steps"] for r in rows] == [1, 8] * len(ContextGaussian.eval_contexts)
    assert [r["context"] for r in rows[::2]] == [list(c) for c in ContextGaussian.eval_contexts]
    assert all(r["mean_error"] < 0.15 for r in rows if r["steps"] == 8)
    assert "likelihood" not in report


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.zeros(3), "contexts must be"),
        (np.zeros((5, 2)), "contexts must be"),
        (np.array(["a", "b"]), "must be numbers"),
        (None, "not a readable .npy"),
    ],
)
def test_bad_context_files_are_one_line_errors(context_run, tmp_path, content, message, capsys):
    path = tmp_path / "c.npy"
    if content is None:
        path.write_text("not numpy")
    else:
        np.save(path, content)
    out = tmp_path / "s.npz"
    assert (
        main(["sample", str(context_run), "--n", "4", "--context", str(path), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_flow_map_objectives_pass_the_context(tmp_path):
    out = tmp_path / "gc-lsd"
    argv = ["train", "--preset", "gaussian-context", "--out", str(out), "--max-steps", "5"]
    assert main([*argv, "objective=lsd", *TINY]) == 0
    run = load_run(out)
    seen = []
    forward = run.model.backbone.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("context"))
        return forward(*args, **kwargs)

    run.model.backbone.forward = spy
    generate(run, 4, steps=2, contexts=torch.tensor([0.5, -0.5]))
    assert len(seen) == 2 and all(torch.equal(c, torch.tensor([[0.5, -0.5]] * 4)) for c in seen)
    # training reached the context branch: its weights moved from their initial values
    assert run.model.backbone.context_embed.null.abs().sum() > 0


def test_user_arrays_with_a_context_file(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    context = torch.rand(500, 1, generator=g) * 4 - 2
    data = torch.cat([context, -context], 1) + 0.1 * torch.randn(500, 2, generator=g)
    np.save(tmp_path / "x.npy", data.numpy())
    np.save(tmp_path / "c.npy", context.numpy())
    out = tmp_path / "run"
    x, c = tmp_path / "x.npy", tmp_path / "c.npy"

    def train(folder, context_file):
        argv = ["train", "--preset", "gmm", "--out", str(folder), "--max-steps", "300", *TINY]
        files = [f"data.path={x}", f"data.context_path={context_file}"]
        return main([*argv, "data.name=array", *files, "train.val_every=100"])

    assert train(out, c) == 0
    run = load_run(out)
    assert run.spec.context_dim == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records)  # the validation rows carry their contexts
    samples = generate(run, 500, method="euler", steps=8, contexts=torch.tensor([1.5])).x
    assert (samples.mean(0) - torch.tensor([1.5, -1.5])).abs().max() < 0.3
    # Rows that do not match, and a context file for a dataset that has none: one line, exit 2.
    np.save(tmp_path / "short.npy", context[:10].numpy())
    capsys.readouterr()
    assert train(tmp_path / "bad", tmp_path / "short.npy") == 2
    assert "rows of" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    argv = ["train", "--preset", "gmm", "--out", str(tmp_path / "b2"), f"data.context_path={c}"]
    assert main(argv) == 2
    assert "context_path applies to name=array" in capsys.readouterr().err
