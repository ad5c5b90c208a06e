"""What every command's config shares: validation when it is made, and the options several commands take."""

from __future__ import annotations

from labelfew.options import Option, validate


class Validated:
    """Configs check their choices and ranges when they are made (`labelfew.options.validate`)."""

    def __post_init__(self) -> None:
        validate(self)


# Options that several commands share, declared once.
QUIET = Option(toggle=False, help="Log lines instead of progress bars.")
SEED = Option(help="Random seed (model init, data order, augmentations, splits).")
WORKERS = Option(
    minimum=0,
    help="DataLoader worker processes.",
    shown="up to 8 with a GPU; half the cores without (0 on 2 cores)",
)
PRECISION = Option(
    choices=("auto", "bf16", "fp16", "no"),
    help="bf16, fp16 or no (float32); auto: bf16 on GPUs that support it, else no.",
)
CHECKPOINT_EVERY = Option(
    above=0, help="Minutes between checkpoints (one is also written at every epoch end)."
)
RESTART = Option(
    toggle=False, help="Start over instead of resuming from this run's checkpoints (deletes them)."
)
FROM = Option(
    flag="--from", help="Artifact file, stage folder or run folder.", shown="the latest run under ./runs"
)
INFERENCE_BATCH = Option(minimum=1, help="Images per forward pass (lower it if memory runs out).")
LOGGER = Option(
    choices=("jsonl", "tensorboard", "mlflow"),
    help="Where the loss, lr and speed go while training runs, besides log.jsonl (always written): "
    "tensorboard (RUN/<stage>/tensorboard/, needs labelfew[tensorboard]) or mlflow (MLFLOW_TRACKING_URI "
    "or ./mlruns, needs labelfew[mlflow]); repeat the flag for both.",
)
