"""`--init`'s frozen backbone fed the data's own pixels: what `evaluate`, `select`, `embed` and
`similar` run in place of a pretrain artifact.

`labelfew.engine.start.frozen_backbone` builds the init as it was trained (its channels, usually
RGB). The images here may be grayscale, deeper than 8 bits or N-channel, so the backbone is first
adapted to the data's channel count (`labelfew.engine.init_channels.adapt_init`: an RGB first conv
summed into one channel, as timm does; repeated and scaled into N), and its spec records the data's
`Decoding`, so the inference loop decodes every image with that window and channel count. The mean
and std stay the init's (adapted): the features are the init's.

Where the decoding comes from:
- the models the init is compared with or used beside (`evaluate`'s run, `select`'s fine-tuned
  model, an `embed --init` index for `similar`): their decoding, so every row sees the same pixels;
- otherwise the images themselves, by the pretrain rule (`labelfew.data.survey.survey_images`, a
  seeded sample): 1 channel when every sampled file is single-channel, N when the files have N > 3
  channels, else 3; deep files through their (0.5%, 99.5%) percentile window, DICOM files through
  their own window where they have one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from labelfew.data.survey import survey_images
from labelfew.engine.init_channels import adapt_init
from labelfew.engine.init_weights import Init
from labelfew.engine.start import FrozenBackbone, frozen_backbone
from labelfew.spec import Decoding


def data_decoding(paths: Sequence[Path], seed: int = 0) -> Decoding:
    """How the images at `paths` decode for a model that has not seen them: the survey's channels
    (N for N-channel files) and window, from a sample drawn with `seed`.

    Raises:
        UserError: files with more than 3 channels whose counts differ (as `survey_images`).
    """
    survey = survey_images(paths, seed=seed)
    return Decoding(survey.multichannel or survey.channels, survey.window, survey.file_windows)


def init_backbone(
    init: Init,
    paths: Sequence[Path],
    image_size: int | None = None,
    decoding: Decoding | None = None,
    seed: int = 0,
) -> FrozenBackbone:
    """`init`'s backbone adapted to `decoding`'s channels (None: `data_decoding(paths, seed)`), its
    spec recording that decoding; image size as `frozen_backbone`. The record keeps the init as read.

    Raises:
        UserError: as `data_decoding`, or a first layer `adapt_init` cannot adapt.
    """
    decoding = decoding if decoding is not None else data_decoding(paths, seed)
    own = frozen_backbone(adapt_init(init, decoding.channels), paths, image_size)
    spec = dataclasses.replace(
        own.spec, channels=decoding.channels, window=decoding.window, file_windows=decoding.file_windows
    )
    return FrozenBackbone(own.model, spec, init)
