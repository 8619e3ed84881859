"""The one image every component runs in (built from ``Dockerfiles/component.Dockerfile``).

Read at import, i.e. at compile time: set ``GENCO_IMAGE`` before compiling to point the
pipeline at your registry (``genco pipeline compile --image`` does it for you).
"""

import os

DEFAULT_IMAGE = "ghcr.io/genco/genco:0.1.0"
GENCO_IMAGE = os.environ.get("GENCO_IMAGE", DEFAULT_IMAGE)
