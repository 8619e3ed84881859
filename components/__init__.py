"""KFP v2 components of the retraining pipeline: typed shells over ``genco``.

Each component is a signature, a docstring and one call into ``genco``; it runs on the
project image (``components.image.GENCO_IMAGE``) with nothing installed at runtime
(``install_kfp_package=False``: the image already has the pinned kfp). Modules import only
stdlib and kfp at top level; ``genco`` is imported inside each body, where the image has it.
"""

from components.attribute_rewards import attribute_rewards
from components.deploy import deploy
from components.evaluate import evaluate
from components.image import GENCO_IMAGE
from components.ingest import ingest
from components.train_generator import train_generator

__all__ = ["GENCO_IMAGE", "attribute_rewards", "deploy", "evaluate", "ingest", "train_generator"]
