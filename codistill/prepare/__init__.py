"""`python -m codistill.prepare`: a job's text or image sources, tokenized or decoded in parallel with Ray Data
into fixed-layout shards and a manifest (codistill.data.manifest), which training then reads lazily.

Ray lives in `pipeline` only; `sources`, `work` and `output` are plain Python run by Ray Data's workers.
"""

from __future__ import annotations

from codistill.prepare.pipeline import PREPARED_KINDS, prepare

__all__ = ["PREPARED_KINDS", "prepare"]
