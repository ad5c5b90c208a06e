"""Using a trained model: inference (the one loop), predict, embed, similar, export.

A use command never imports a stage module; importing the `labelfew.stages` package here only
fills the stage registry (`labelfew.registry.register_stage`) through which `--from` finds models.
"""

import labelfew.stages  # noqa: F401
