"""The ``l2c`` command at small settings: learn, show, bench, and the errors it names."""
from __future__ import annotations

import json
import math

import pytest

import l2c_kernels as l2c
from l2c_kernels import metrics
from l2c_kernels.cli import build_parser, main


def test_learn_show_bench_on_the_bundled_dit(tmp_path, capsys):
    out = tmp_path / "dit.l2c.json"
    rc = main(["learn", "--model", "dit-digits", "--steps", "4", "--budget", "0.4", "--iterations", "2",
               "--batch", "2", "--threads", "2", "-o", str(out)])
    assert rc == 0 and out.exists() and out.with_suffix(".png").exists()
    sched = l2c.Schedule.load(out)
    assert sched.num_steps == 4 and sched.forecast in ("none", "linear", "quadratic")
    sched.validate_for(l2c.models.load("dit-digits").transformer)
    assert sched.flops_removed_fraction() >= 0.4 - 1e-9
    capsys.readouterr()
    assert main(["show", str(out), "--png", str(tmp_path / "h.png")]) == 0
    assert "schedule for DiTTransformer2DModel" in capsys.readouterr().out and (tmp_path / "h.png").exists()
    assert main(["bench", str(out), "--samples", "2", "--repeats", "1", "--threads", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "dit-digits" and report["steps"] == 4
    # the same schedule on the other bundled model is refused with its reason
    assert main(["bench", str(out), "--model", "pixart-digits", "--samples", "2", "--repeats", "1"]) == 2
    assert "branches" in capsys.readouterr().err


def test_learn_several_budgets_writes_a_front(tmp_path):
    """``--budget 0.3 0.6`` learns both in one run and writes one schedule per budget, named by it."""
    from l2c_kernels.cli import front_path

    out = tmp_path / "dit.l2c.json"
    rc = main(["learn", "--model", "dit-digits", "--steps", "5", "--budget", "0.6", "0.3", "--iterations", "2",
               "--batch", "2", "--threads", "2", "-o", str(out)])
    assert rc == 0 and not out.exists()
    paths = [tmp_path / "dit.b30.l2c.json", tmp_path / "dit.b60.l2c.json"]
    assert [front_path(out, 0.3), front_path(out, 0.6)] == paths
    front = [l2c.Schedule.load(p) for p in paths]
    for s, b in zip(front, (0.3, 0.6)):
        assert s.params["budget"] == b and s.flops_removed_fraction() >= b - 1e-9
    assert front[0].params["calibration_error_db"] <= front[1].params["calibration_error_db"]
    assert front_path(tmp_path / "x.json", 0.75) == tmp_path / "x.b75.json"
    assert front_path(out, speedup=1.5) == tmp_path / "dit.1.5x.l2c.json"
    assert front_path(out, speedup=2.0) == tmp_path / "dit.2x.l2c.json"


@pytest.mark.parametrize("argv, message", [
    (["learn", "--budget", "1.5"], "--budget must be in (0, 1)"),
    (["learn", "--budget", "0"], "--budget must be in (0, 1)"),
    (["learn", "--model", "sd3"], "unknown model 'sd3'"),
    (["learn", "--speedup", "1"], "--speedup is a factor above 1"),
    (["learn", "--speedup", "2", "--budget", "0.5"], "give --budget or --speedup, not both"),
    (["show", "no-such-file.json"], "no-such-file.json"),
])
def test_bad_input_named(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    p = build_parser()
    for cmd in ("demo", "learn", "show", "bench"):
        with pytest.raises(SystemExit):
            p.parse_args([cmd, "--help"])
        assert "usage: l2c " + cmd in capsys.readouterr().out
    with pytest.raises(SystemExit):
        p.parse_args(["learn", "--forecast", "cubic"])


def test_learn_and_bench_on_a_saved_pipeline(tmp_path, capsys):
    """``l2c learn --pipeline DIR``: a DiT-XL/2-shaped pipeline written with save_pretrained, loaded offline."""
    from tests.learn.pipeline_models import dit_xl_shaped_pipeline

    pipe = dit_xl_shaped_pipeline()
    folder = tmp_path / "dit"
    pipe.save_pretrained(folder)
    out = tmp_path / "dit.l2c.json"
    rc = main(["learn", "--pipeline", str(folder), "--labels", "207", "360", "--steps", "3", "--budget", "0.4",
               "--iterations", "2", "--batch", "2", "--guidance-scale", "3.0", "-o", str(out)])
    assert rc == 0 and out.exists()
    sched = l2c.Schedule.load(out)
    sched.validate_for(pipe.transformer)
    assert sched.params["pipeline"] == str(folder) and sched.params["guidance_scale"] == 3.0
    assert sched.flops_removed_fraction() >= 0.4 - 1e-9
    capsys.readouterr()
    assert main(["bench", str(out), "--pipeline", str(folder), "--labels", "207", "360", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3 and report["guidance_scale"] == 3.0 and report["samples"] == 2
    assert report["flops_removed"] == round(sched.flops_removed_fraction(), 4)
    # the speedup is the ratio of the two medians it reports (each rounded to 1e-4 s: the ratio to its rounding)
    ratio = report["full_seconds"] / report["cached_seconds"]
    slack = ratio * 0.5e-4 * (1 / report["full_seconds"] + 1 / report["cached_seconds"]) + 0.5e-3
    assert abs(report["speedup"] - ratio) <= slack
    # input that does not fit the pipeline is named
    assert main(["learn", "--pipeline", str(folder), "--labels", "1000", "--steps", "3"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["learn", "--pipeline", str(folder), "--labels", "1", "--height", "18", "--steps", "3"]) == 2
    assert "height=18" in capsys.readouterr().err
    assert main(["learn", "--pipeline", str(tmp_path / "missing"), "--steps", "3"]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_learn_show_bench_on_flux_digits(tmp_path, capsys):
    """flux-digits learns with CFG at its recommended scale on Euler flow matching, and bench samples it the same way."""
    out = tmp_path / "flux.l2c.json"
    rc = main(["learn", "--model", "flux-digits", "--steps", "3", "--budget", "0.5", "--iterations", "2", "--batch", "1",
               "--calibration-samples", "2", "--threads", "1", "-o", str(out)])
    assert rc == 0 and out.exists() and out.with_suffix(".png").exists()
    sched = l2c.Schedule.load(out)
    sched.validate_for(l2c.models.load("flux-digits").transformer)
    assert sched.branches == ["block"] and sched.num_steps == 3 and sched.sampler["class"] == "FlowMatchEulerDiscreteScheduler"
    assert sched.params["model"] == "flux-digits" and sched.params["scheduler"] == "flow-euler"
    assert sched.params["guidance_scale"] == 7.0 and sched.params["iterations"] == 2
    assert "R" in str(sched.plan)
    capsys.readouterr()
    assert main(["show", str(out), "--png", str(tmp_path / "h.png")]) == 0
    assert "FluxTransformer2DModel" in capsys.readouterr().out
    assert main(["bench", str(out), "--samples", "2", "--repeats", "1", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "flux-digits" and report["steps"] == 3 and report["scheduler"] == "flow-euler"
    assert report["cfg"] == 7.0 and report["full"]["psnr"] == float("inf")
    # the reported PSNR is that of the cached images against full compute, regenerated here from the same noise
    # (seed 0, labels 0 and 1); a reused block changes them, so it is finite
    bundle = l2c.models.load("flux-digits")
    kw = dict(labels=[0, 1], steps=3, scheduler="flow-euler", cfg=7.0, seed=0, progress=False)
    full = l2c.models.sample(bundle, transformer=bundle.transformer, **kw)
    cached = l2c.models.sample(bundle, transformer=l2c.compile_schedule(bundle.transformer, sched), **kw)
    expected = float(metrics.psnr(cached, full))
    assert math.isfinite(expected) and report["cached"]["psnr"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["learn", "--model", "flux-digits", "--scheduler", "ddim", "--steps", "3"], "ddim does not fit flux-digits"),
    (["learn", "--model", "flux-digits", "--true-cfg-scale", "4", "--steps", "3"], "FluxPipeline's true CFG"),
    (["demo", "--model", "dit-digits", "--scheduler", "flow-euler", "--steps", "3"], "flow-euler does not fit"),
    (["learn", "--model", "flux-digits", "--steps", "3", "--budget", "0.5", "--warm-up", "2"],
     "budget 0.5 cannot be removed when the first 2 of 3 steps are computed in full"),
])
def test_flux_digits_bad_input_named(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_on_flux_digits(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--model", "flux-digits", "--steps", "3", "--iterations", "2", "--batch", "1",
               "--calibration-samples", "2", "--samples", "2", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "flux-digits" and report["scheduler"] == "flow-euler" and report["cfg"] == 7.0
    assert report["flops_removed"] >= 0.3
    assert all((out / f).exists() for f in ("side_by_side.png", "schedule_heatmap.png", "schedule.l2c.json"))
    # the reported PSNR is that of the saved schedule's images against full compute, regenerated here (labels 0, 1,
    # seed 0); the schedule reuses blocks, so it is finite
    bundle, sched = l2c.models.load("flux-digits"), l2c.Schedule.load(out / "schedule.l2c.json")
    kw = dict(labels=[0, 1], steps=3, scheduler="flow-euler", cfg=7.0, seed=0, progress=False)
    full = l2c.models.sample(bundle, transformer=bundle.transformer, **kw)
    cached = l2c.models.sample(bundle, transformer=l2c.compile_schedule(bundle.transformer, sched), **kw)
    expected = float(metrics.psnr(cached, full))
    assert math.isfinite(expected) and report["results"]["cached"]["psnr"] == pytest.approx(expected, rel=1e-12)
    assert "flux-digits" in capsys.readouterr().out


def test_help_names_flux_digits_and_true_cfg(capsys):
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["learn", "--help"])
    text = capsys.readouterr().out
    assert "flux-digits" in text and "flow-euler" in text and "--true-cfg-scale" in text and "--negative-prompt" in text
    with pytest.raises(SystemExit):
        p.parse_args(["demo", "--help"])
    assert "flux-digits" in capsys.readouterr().out


def test_warm_up_option_takes_auto_or_a_step_count(capsys):
    with pytest.raises(SystemExit):
        main(["learn", "--warm-up", "many"])
    assert "expected 'auto' or a number of steps" in capsys.readouterr().err
