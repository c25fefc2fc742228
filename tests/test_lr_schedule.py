"""The learning-rate schedule across resumes, with the cosine schedule of the CPU recipe (configs/cpu/phase2.yaml:
20 warm-up steps, cosine to 0 at 200): the same horizon continues exactly; a larger --trainer.max_steps stretches
the rest of the cosine from the learning rate reached (no re-warm-up, no jump) to 0 at the new horizon, as
dcssdae/lr_schedule.py documents; a finished cosine cannot be extended. Through DCSSDAESystem.configure_optimizers and
the loading order Lightning uses (optimiser state, then scheduler state)."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_system import TINY

from dcssdae.system import DCSSDAESystem

RECIPE = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "cpu" / "phase2.yaml").read_text())
SETTINGS = {k: RECIPE["model"]["init_args"][k] for k in ("lr", "warmup_steps", "lr_schedule")}
HORIZON = RECIPE["trainer"]["max_steps"]


def optimiser(max_steps: int, **settings):
    """(optimizer, scheduler) of a tiny system with the recipe's schedule, for a run of `max_steps`."""
    model = DCSSDAESystem(**TINY, **{**SETTINGS, **settings})
    model._trainer = SimpleNamespace(max_steps=max_steps)
    config = model.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def run(optimizer, scheduler, steps: int) -> list[float]:
    """The learning rate of each of the next `steps` optimiser steps (no gradients: only the schedule moves)."""
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def resume(optimizer, scheduler, max_steps: int, **settings):
    """A new run of `max_steps` restored from the state of (optimizer, scheduler), as Lightning restores it."""
    new_optimizer, new_scheduler = optimiser(max_steps, **settings)
    new_optimizer.load_state_dict(optimizer.state_dict())
    new_scheduler.load_state_dict(scheduler.state_dict())
    return new_optimizer, new_scheduler


def test_the_recipe_uses_the_cosine_schedule():
    assert SETTINGS["lr_schedule"] == "cosine" and SETTINGS["warmup_steps"] == 20 and HORIZON == 200


def test_a_resume_with_the_same_horizon_continues_exactly():
    straight = run(*optimiser(HORIZON), HORIZON)
    first = optimiser(HORIZON)
    head = run(*first, 120)
    tail = run(*resume(*first, HORIZON), HORIZON - 120)
    assert head + tail == straight
    lr, w = SETTINGS["lr"], SETTINGS["warmup_steps"]
    assert straight[5] == pytest.approx(lr * 6 / w) and straight[100] == pytest.approx(
        lr * 0.5 * (1 + math.cos(math.pi * (100 - w) / (HORIZON - w))))


@pytest.mark.parametrize("stop", [120, 60, 199])
def test_extending_the_cosine_stretches_the_rest_from_the_rate_reached(stop):
    """Stopped after `stop` of 200 steps and extended to 400: the next step's rate is the one the run had reached;
    the phase goes on from p = (stop - 20) / 180 to 1 linearly over the remaining 400 - stop steps; the rate never
    rises and reaches 0 at step 400."""
    lr, w, new = SETTINGS["lr"], SETTINGS["warmup_steps"], 2 * HORIZON
    first = optimiser(HORIZON)
    head = run(*first, stop)
    reached = first[0].param_groups[0]["lr"]
    assert reached == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (stop - w) / (HORIZON - w))))
    optimizer, scheduler = resume(*first, new)
    tail = run(optimizer, scheduler, new - stop)
    assert tail[0] == pytest.approx(reached, rel=1e-9)  # continuous at the resume step: no jump, no re-warm-up
    p = (stop - w) / (HORIZON - w)
    expected = [lr * 0.5 * (1 + math.cos(math.pi * (p + (1 - p) * j / (new - stop)))) for j in range(new - stop)]
    assert tail == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert all(b <= a for a, b in zip(head[w:] + tail, head[w + 1:] + tail[1:]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # 0 at the new horizon
    # the horizon is stored: a second resume at 400 continues this stretched schedule exactly
    again = optimiser(HORIZON)
    run(*again, stop)
    again = resume(*again, new)
    part = run(*again, 50)
    assert tail[:50] == part and run(*resume(*again, new), new - stop - 50) == tail[50:]


def test_extending_inside_the_warm_up_keeps_it_and_the_cosine_of_the_new_horizon():
    first = optimiser(HORIZON)
    run(*first, 10)
    tail = run(*resume(*first, 2 * HORIZON), 2 * HORIZON - 10)
    assert tail == pytest.approx(run(*optimiser(2 * HORIZON), 2 * HORIZON)[10:], rel=1e-12)


def test_a_finished_cosine_cannot_be_extended_and_a_new_lr_given_on_resume_applies():
    first = optimiser(HORIZON)
    run(*first, HORIZON)
    with pytest.raises(ValueError, match=r"reached learning rate 0 at step 200: extending it to trainer.max_steps "
                                         r"400 would train at learning rate 0; start a new phase"):
        resume(*first, 2 * HORIZON)
    # an lr given with --ckpt_path replaces the checkpoint's, on the same schedule
    first = optimiser(HORIZON)
    run(*first, 120)
    halved = run(*resume(*first, HORIZON, lr=SETTINGS["lr"] / 2), HORIZON - 120)
    assert halved == pytest.approx([r / 2 for r in run(*optimiser(HORIZON), HORIZON)[120:]], rel=1e-12)
