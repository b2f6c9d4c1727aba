"""The `lorapro train` command line of the checkpoint/resume tests: the builtin tiny model, 6 steps of LoRA-Pro with
dropout (so the restored RNG state matters) on 16 records (4 steps per epoch: a resumed run crosses an epoch)."""


def tiny_train_argv(data, out, *extra):
    """``lorapro train`` arguments; ``extra`` key=value pairs come last and override the defaults here."""
    return [
        "train",
        f"data.train={data}",
        "method=lora-pro",
        f"output_dir={out}",
        "train.max_steps=6",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "data.train_size=16",
        "optim.lr=5e-3",
        "lora.r=4",
        "lora.dropout=0.1",
        *extra,
    ]
