"""What a run reports besides its JSONL log: a progress bar for every evaluation, and TensorBoard when asked."""

import importlib.machinery
import re
import sys
import types

from lorapro.cli import main as lorapro_main


def test_final_evaluation_has_a_progress_bar(tmp_path, add_data, capsys):
    # 10 eval examples in micro-batches of 4: 3 batches
    assert lorapro_main(["train", f"data.train={add_data}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                         "train.global_batch_size=4", "data.train_size=8", "data.eval_size=10"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"lora-pro eval: 100%\|[^|]*\| 3/3 ", err), err[-2000:]


class _FakeWriter:
    """Records what TensorBoardCallback writes (the real one needs the tensorboard package)."""

    instances = []

    def __init__(self, log_dir=None, **kwargs):
        self.log_dir, self.scalars = log_dir, []
        _FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def add_text(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def test_report_to_tensorboard_gets_the_training_loss(tmp_path, add_data, monkeypatch):
    import json

    fake = types.ModuleType("tensorboardX")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # torch's writer needs tensorboard itself
    _FakeWriter.instances.clear()
    out = tmp_path / "run"
    assert lorapro_main(["train", f"data.train={add_data}", f"output_dir={out}", "train.max_steps=3",
                         "train.global_batch_size=4", "train.report_to=tensorboard"]) == 0
    (writer,) = _FakeWriter.instances
    assert writer.log_dir == str(out / "tensorboard")
    logged = [(step, value) for tag, step, value in writer.scalars if tag == "train/loss"]
    expected = [(r["step"], r["loss"]) for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert [s for s, _ in logged] == [1, 2, 3]
    assert [round(v, 5) for _, v in logged] == [round(v, 5) for _, v in expected]
