"""PyTorch Lightning's automatic optimization drives the optimizers through ``step(closure)`` (issue 11, defect 2).

Lightning is not a dependency (its import alone costs several seconds), so this runs only where it is installed
(``pip install lightning``); tests/test_optim_hardening.py checks the closure contract itself without it.
"""

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
pytest.importorskip("peft")

from lorapro import LoRAProAdamW, LoRAProSGD  # noqa: E402
from toy_lora import MLP, backward, batches, peft_toy  # noqa: E402


def _model():
    torch.manual_seed(0)
    return peft_toy(MLP(), ["up", "mid", "down"], dtype=torch.float32)


def _make_opt(kind, model):
    return LoRAProSGD(model, lr=0.05, momentum=0.9) if kind == "sgd" else LoRAProAdamW(model, lr=1e-2, mode=kind)


class _Module(L.LightningModule):
    def __init__(self, kind):
        super().__init__()
        self.model, self.kind = _model(), kind

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x).float(), y)

    def configure_optimizers(self):
        return _make_opt(self.kind, self.model)


@pytest.mark.parametrize("kind", ["sgd", "full", "efficient", "factored"])
def test_lightning_automatic_optimization_equals_a_plain_loop(kind):
    data = batches(4, dtype=torch.float32)
    module = _Module(kind)
    dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    trainer = L.Trainer(max_steps=len(data), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(dataset, batch_size=8))
    plain = _model()
    opt = _make_opt(kind, plain)
    for batch in data:
        opt.zero_grad()
        backward(plain, batch)
        opt.step()
    for p, q in zip(module.model.parameters(), plain.parameters()):
        assert torch.equal(p, q)  # the same steps, bit for bit
    assert max((p - q).abs().max() for p, q in zip(plain.parameters(), _model().parameters())) > 1e-3
