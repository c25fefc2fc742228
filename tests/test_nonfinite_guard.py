"""NonFiniteGuard: steps with a NaN/Inf loss term or gradient are skipped (weights and AdamW moments untouched)
and counted; too many in a row stop the run with a message naming the term and the step."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dcssdae.nonfinite_guard import NonFiniteGuard, NonFiniteLossError


class Tiny(L.LightningModule):
    """y = w x; loss terms {"mse", "lpips"}; `bad_steps` maps a global step to how it goes wrong."""

    def __init__(self, bad_steps: dict[int, str]):
        super().__init__()
        self.net = torch.nn.Linear(4, 4)
        self.bad_steps = bad_steps
        self.snapshots: dict[int, tuple] = {}  # global step -> (weights, exp_avg) before its optimiser step

    def training_step(self, batch, batch_idx):
        (x,) = batch
        y = self.net(x)
        terms = {"mse": y.pow(2).mean(), "lpips": y.abs().mean()}
        how = self.bad_steps.get(self.global_step)
        if how == "loss":
            terms["lpips"] = terms["lpips"] * float("nan")
        elif how == "grad":  # finite loss (sqrt(0) = 0), NaN gradient (d sqrt / dw at 0 is inf, times 0)
            terms["mse"] = terms["mse"] + torch.sqrt(self.net.weight.sum() * 0).sum()
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return terms["mse"] + terms["lpips"]

    def on_train_batch_start(self, batch, batch_idx):
        opt = self.trainer.optimizers[0]
        state = opt.state.get(self.net.weight, {})
        exp_avg = state["exp_avg"].clone() if "exp_avg" in state else None
        self.snapshots[self.global_step] = (self.net.weight.detach().clone(), exp_avg)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit(module, guard, steps):
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", callbacks=[guard], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(how, caplog):
    module, guard = Tiny({2: how, 3: how}), NonFiniteGuard(max_consecutive=3)
    trainer = fit(module, guard, 6)
    assert guard.skipped == 2 and guard.consecutive == 0
    assert trainer.callback_metrics["train/skipped_steps"] == 2
    w = {s: module.snapshots[s][0] for s in module.snapshots}
    m = {s: module.snapshots[s][1] for s in module.snapshots}
    # Steps 2 and 3 were skipped: weights and Adam moments after them equal those before step 2 ...
    # (global_step still advances: Lightning counts the optimizer.step() call, which updated nothing.)
    assert torch.equal(w[2], w[3]) and torch.equal(w[3], w[4])
    assert torch.equal(m[2], m[3]) and torch.equal(m[3], m[4])
    assert trainer.optimizers[0].state[module.net.weight]["step"] == 6 - 2
    # ... while good steps do update, and nothing non-finite got in.
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[4], w[5])
    assert torch.isfinite(module.net.weight).all()
    what = "lpips=nan" if how == "loss" else "non-finite gradients in 1 parameter(s) (net.weight)"
    assert what in caplog.text and "step 2" in caplog.text


def test_too_many_in_a_row_stops_with_the_term_and_step():
    module, guard = Tiny({s: "loss" for s in range(3, 100)}), NonFiniteGuard(max_consecutive=4)
    with pytest.raises(NonFiniteLossError) as info:
        fit(module, guard, 20)
    message = str(info.value)
    assert "4 steps in a row" in message and "lpips=nan" in message and "step 6" in message
    assert "mse" not in message  # only the non-finite term is named
    assert torch.isfinite(module.net.weight).all()


def test_guard_state_is_saved():
    guard = NonFiniteGuard()
    guard.skipped, guard.consecutive = 5, 2
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert (other.skipped, other.consecutive) == (5, 2)
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=-1)
