"""``GraftedModel``: the base class of every hf-graft model.

It adds to ``PreTrainedModel`` what every graft needs on the Hub: an ``auto_map`` naming all the
Auto classes the graft answers to (so ``AutoModel`` and the task's Auto class both load it as remote
code where hf-graft is absent), a model card written on every save when hf-graft is installed, and a
``push_to_hub`` that uploads exactly what ``save_pretrained`` wrote, card included.
"""

import tempfile
from typing import Callable, ClassVar, Optional

from huggingface_hub import HfApi
from transformers import PreTrainedModel

from .configuration_grafted import GraftedConfig


class GraftedModel(PreTrainedModel):
    """Base class of hf-graft models; see the concrete classes for the architectures."""

    config_class = GraftedConfig
    base_model_prefix = "graft"
    #: Auto classes written into ``config.auto_map``; concrete classes name their task class too.
    auto_classes: ClassVar[tuple] = ("AutoModel",)
    #: ``writer(model, save_directory, tags=, repo_id=)`` writes the model card; hf-graft sets it.
    model_card_writer: ClassVar[Optional[Callable]] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, with one clear error for a corrupt weights file."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            raise ValueError(
                f"The weights of {str(pretrained_model_name_or_path)!r} are not a valid safetensors file "
                f"({error}): the file is truncated or corrupt. Download it again (force_download=True) "
                "or save the model again."
            ) from error

    def _record_auto_map(self):
        model_ref = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        config_ref = f"{type(self.config).__module__.rsplit('.', 1)[-1]}.{type(self.config).__name__}"
        auto_map = {"AutoConfig": config_ref}
        auto_map.update({name: model_ref for name in self.auto_classes})
        self.config.auto_map = auto_map

    def save_pretrained(self, save_directory, *args, tokenizer=None, **kwargs):
        """Save weights (safetensors), config, the modeling code and, with hf-graft, a model card.

        ``tokenizer`` (or any processor with ``save_pretrained``) is saved beside the model, so
        ``pipeline(task, model=save_directory)`` works from the folder alone.
        """
        self._record_auto_map()
        super().save_pretrained(save_directory, *args, **kwargs)
        main = kwargs.get("is_main_process", True)
        if tokenizer is not None and main:
            tokenizer.save_pretrained(save_directory)
        writer = GraftedModel.model_card_writer
        if writer is not None and main:
            writer(self, save_directory, **getattr(self, "_push_context", {}))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        tags: Optional[list] = None,
        max_shard_size="5GB",
        tokenizer=None,
    ):
        """Create ``repo_id`` if needed and upload what ``save_pretrained`` writes (``tokenizer`` too), in one commit.

        The Hub endpoint comes from ``HF_ENDPOINT`` as for every huggingface_hub call.
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self._push_context = {"tags": tags, "repo_id": repo_id}
            try:
                self.save_pretrained(folder, max_shard_size=max_shard_size, tokenizer=tokenizer)
            finally:
                del self._push_context
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                revision=revision,
                create_pr=create_pr,
            )
