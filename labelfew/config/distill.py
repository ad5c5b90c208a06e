"""`distill`'s config: SimCLRv2 distillation of the fine-tuned teacher into a student."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from labelfew.config.shared import (
    CHECKPOINT_EVERY,
    FOLLOW_LINKS,
    FROM,
    INIT,
    INIT_PREFIX,
    LOGGER,
    PRECISION,
    QUIET,
    RESTART,
    SEED,
    SMALL_STEM,
    WORKERS,
    Validated,
    require_init,
)
from labelfew.errors import UserError
from labelfew.options import option, validate


@dataclass(frozen=True)
class DistillConfig(Validated):
    """SimCLRv2 distillation (arXiv 2006.10029, eq. 2): a student learns the fine-tuned teacher's
    softmax on augmented unlabeled images."""

    unlabeled: Path = option(
        help="Folder of unlabeled images (searched recursively), e.g. the pretraining folder."
    )
    source: Path | None = option(
        None, FROM, help="The teacher: a fine-tuned artifact, its stage folder or a run folder."
    )
    arch: str | None = option(
        None,
        help="The student's timm arch; another than the teacher's starts from random init (or `--from-pretrain`).",
        shown="the teacher's, from the run's pretrained backbone",
    )
    from_pretrain: Path | None = option(
        None, help="A pretrain artifact (or its folder) to start a student of another arch from."
    )
    init: str | None = option(
        None,
        INIT,
        help="Start the student from weights that already exist (instead of `--from-pretrain` or random "
        "init): `timm:NAME.TAG`, a `.safetensors`/`.pth` file, an exported folder or a labelfew run.",
    )
    init_prefix: str | None = option(None, INIT_PREFIX)
    small_stem: bool | None = option(
        None, SMALL_STEM, shown="the teacher's for a random-init student; a pretrained start's own"
    )
    temperature: float | str = option(
        "auto",
        choices=("auto",),
        above=0,
        help="Softmax temperature of teacher and student alike; auto: SimCLRv2's (section 3), 0.1 when the "
        "student's arch is the teacher's (self-distillation), 1.0 for another arch (big-to-small). The loss "
        "is multiplied by T² (Hinton et al.), which keeps LARS's unadapted layers stable at 0.1.",
    )
    labels: Path | None = option(
        None, help="Label CSV or class-per-folder tree for the labelled loss (with `--alpha`)."
    )
    alpha: float = option(
        0.0,
        minimum=0,
        help="Weight of the labelled cross-entropy added to the distillation loss, whose weight stays 1 (0: "
        "unlabeled only, which SimCLRv2 finds almost as good at 1% of the labels). Not the paper's α: its "
        "eq. 3 weights the distillation term by α and the labelled one by 1 − α.",
    )
    out: Path | None = option(
        None, help="Output folder.", shown="`distill-<labels>/` in the teacher's run folder"
    )
    epochs: int = option(
        50,
        minimum=1,
        help="Training epochs (SimCLRv2 distils for half its pretraining epochs, 400 of 800; half of "
        "pretrain's 100 here).",
    )
    batch_size: int = option(
        256, minimum=2, help="The **global** batch (per process × processes); SimCLRv2 keeps pretraining's."
    )
    optimizer: str = option(
        "lars",
        choices=("lars", "sgd", "adamw"),
        help="lars (SimCLRv2 distils with pretraining's), sgd or adamw.",
    )
    lr: float | None = option(
        None,
        above=0,
        help="Learning rate, after a linear warmup over 10% of the steps, then cosine.",
        shown="pretraining's 0.075·√B (lars), 0.05·B/256 (sgd), 1e-3 (adamw)",
    )
    weight_decay: float = option(1e-6, minimum=0, help="Weight decay (pretraining's); not on the classifier.")
    precision: str = option("auto", PRECISION)
    augment_on: str = option(
        "auto",
        choices=("auto", "device", "workers"),
        help="As `pretrain`: `device` keeps the decoded images in memory, `workers` streams them.",
    )
    memory_budget: float = option(
        4.0, above=0, hint="give a positive size in GiB (default 4)", help="GiB the decoded images may take."
    )
    workers: int | None = option(None, WORKERS)
    seed: int = option(0, SEED)
    logger: tuple[str, ...] = option(("jsonl",), LOGGER)
    checkpoint_every: float = option(10.0, CHECKPOINT_EVERY)
    restart: bool = option(False, RESTART)
    follow_links: bool = option(False, FOLLOW_LINKS)
    quiet: bool = option(False, QUIET)

    def __post_init__(self) -> None:
        validate(self)
        if self.init is not None and self.from_pretrain is not None:
            raise UserError(
                f"--init {self.init}: not with --from-pretrain (the student starts from one); drop one"
            )
        require_init(self.init, init_prefix=self.init_prefix)
