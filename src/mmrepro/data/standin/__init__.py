"""Stand-in raw data: random files in exactly the on-disk layout each real loader reads, so the whole
paper grid can be rehearsed (fetch -> convert -> train -> report) before anyone holds the real data.

One module per format family, each split into building arrays and writing files (the writers are
the ones the tests use to make their tiny inputs): :mod:`.sequences` (MMSA and MulT pickles),
:mod:`.mmin` (IEMOCAP's HDF5 folder), :mod:`.food` (UPMC Food-101 images, titles and encoder
folders), :mod:`.volumes` (BraTS NIfTI cases). :mod:`.plan` decides how many samples (``tiny``: a
handful per split; ``full``: the real counts, cut in proportion past a byte budget per entry) and
:mod:`.generate` writes them all plus the config overlay ``stand_in.yaml`` and the manifest
``stand_in.json``. Command line: ``mmrepro stand-in --help``.
"""

from __future__ import annotations

from mmrepro.data.standin.generate import MANIFEST, OVERLAY, generate
from mmrepro.data.standin.plan import SCALES, Scale

__all__ = ["MANIFEST", "OVERLAY", "SCALES", "Scale", "generate"]
