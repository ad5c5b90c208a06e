"""labelfew: many images, few labels.

SimCLR contrastive pretraining on unlabeled images, label-efficient fine-tuning on a small
labelled subset, and evaluation (kNN, linear probe, fine-tuned model), from the command line.
"""

__version__ = "0.1.0"
