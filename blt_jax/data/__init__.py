"""Byte-level data pipeline: document sources, packing and grain loaders.

See `pipeline` for the batch contract and `default_data_config` for settings.
"""

from blt_jax.data.packing import PackedWindowsIterDataset
from blt_jax.data.packing import to_token_doc
from blt_jax.data.pipeline import build_sources
from blt_jax.data.pipeline import build_train_dataset
from blt_jax.data.pipeline import build_train_source
from blt_jax.data.pipeline import default_data_config
from blt_jax.data.pipeline import document_dataset
from blt_jax.data.pipeline import has_validation
from blt_jax.data.pipeline import EvalIterator
from blt_jax.data.pipeline import make_eval_iterator
from blt_jax.data.pipeline import make_train_iterator
from blt_jax.data.pipeline import state_from_bytes
from blt_jax.data.pipeline import state_to_bytes
from blt_jax.data.sources import DocumentSource
from blt_jax.data.sources import file_corpus
from blt_jax.data.sources import in_validation
from blt_jax.data.sources import stdlib_corpus
