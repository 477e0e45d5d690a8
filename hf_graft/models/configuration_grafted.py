"""``GraftedConfig``: the base configuration of every hf-graft model."""

from transformers import PretrainedConfig


class GraftedConfig(PretrainedConfig):
    """Base configuration of a graft: a host model that carries parts of a donor model.

    Each kind of graft (vision, causal LM) subclasses it with the fields that describe its
    architecture; this base holds what every graft records about where it came from.

    Args:
        donor_name (`str`, *optional*):
            The donor the grafted part came from (a timm model name, a Hub repo id or a path).
        graft_dataset (`str`, *optional*):
            The dataset the graft was trained and evaluated on; shown on the model card.
        graft_metrics (`dict`, *optional*):
            Measured results (``{"test_accuracy": 0.95, ...}``, numbers only) shown on the model
            card and in the card's ``model-index``.
    """

    model_type = "grafted"

    def __init__(self, donor_name=None, graft_dataset=None, graft_metrics=None, **kwargs):
        self.donor_name = donor_name
        self.graft_dataset = graft_dataset
        self.graft_metrics = {str(k): float(v) for k, v in (graft_metrics or {}).items()}
        super().__init__(**kwargs)
