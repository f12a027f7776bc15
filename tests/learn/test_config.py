"""``learn_schedule(model, LearnConfig(...))``: the config form learns what the keyword form learns."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

import l2c_kernels as l2c
from l2c_kernels.learn import LearnConfig, train_router
from l2c_kernels.learn.config import REQUEST
from tests.learn.test_router import tiny_bundle

OPTIONS = dict(iterations=4, batch_size=2, calibration_samples=2, progress=False, seed=2)


def test_config_defaults_are_the_learners():
    defaults = {n: p.default for n, p in inspect.signature(train_router).parameters.items()
                if n not in ("obj", "shared") and n not in REQUEST}
    cfg = LearnConfig()
    assert {k: getattr(cfg, k) for k in defaults} == defaults
    assert cfg.budgets is None and cfg.speedups is None and cfg.threshold is None


def test_config_form_learns_the_keyword_forms_schedule():
    by_keywords = l2c.learn_schedule(tiny_bundle(), 6, 0.5, **OPTIONS)
    by_config = l2c.learn_schedule(tiny_bundle(), LearnConfig(num_inference_steps=6, budget=0.5, **OPTIONS))
    assert by_config.plan == by_keywords.plan and by_config.forecast == by_keywords.forecast
    assert by_config.params["iterations"] == 4 and by_config.params["seed"] == 2


def test_a_front_from_a_config():
    cfg = LearnConfig(num_inference_steps=6, budgets=(0.3, 0.5), **OPTIONS)
    front = l2c.learn_schedule(tiny_bundle(), cfg)
    assert [s.params["budget"] for s in front] == [0.3, 0.5]
    assert front[1].plan == l2c.learn_front(tiny_bundle(), 6, [0.3, 0.5], **OPTIONS)[1].plan


@pytest.mark.parametrize("call, message", [
    (lambda: l2c.learn_schedule(tiny_bundle(), 6, bogus=1), "unknown learning option "),
    (lambda: l2c.learn_schedule(tiny_bundle(), LearnConfig(num_inference_steps=6), iterations=3),
     "given beside a LearnConfig: set them in the config"),
    (lambda: l2c.learn_schedule(tiny_bundle(), LearnConfig(num_inference_steps=6), 0.5),
     "budget given beside a LearnConfig"),
])
def test_options_that_do_not_fit_the_config_are_named(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_config_is_a_frozen_dataclass():
    cfg = LearnConfig(num_inference_steps=6)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'budget'"):
        cfg.budget = 0.9
    assert dataclasses.replace(cfg, budget=0.9).budget == 0.9
