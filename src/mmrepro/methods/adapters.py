"""Test-time adapters: a trained model meets a stream of unlabelled target batches.

``predict(batch)`` returns predictions and may update the model as it goes (online) or reset it
(episodic). Batches reach adapters with their labels removed (``batch.y is None``), so no adapter
can peek at target labels. The trivial member, ``source_only``, never adapts.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.registry import ADAPTERS


class TestTimeAdapter:
    name = "base"

    def __init__(self, model: nn.Module):
        self.model = model

    def predict(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError


@ADAPTERS.register("source_only")
class SourceOnly(TestTimeAdapter):
    """The source model as trained: evaluation mode, no gradient, no update."""

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        return self.model(batch).pred
