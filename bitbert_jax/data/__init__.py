"""Data: GLUE/custom task loading, tokenization, bucketed batching, metrics, corpus streaming."""

from bitbert_jax.data.batching import batch_plan
from bitbert_jax.data.batching import default_bucket_lengths
from bitbert_jax.data.batching import epoch_batches
from bitbert_jax.data.batching import eval_batches
from bitbert_jax.data.batching import make_batch
from bitbert_jax.data.batching import num_batches
from bitbert_jax.data.batching import padding_fraction
from bitbert_jax.data.corpus import corpus_batches
from bitbert_jax.data.corpus import corpus_sources
from bitbert_jax.data.glue import hub_offline
from bitbert_jax.data.glue import load_custom_split
from bitbert_jax.data.glue import load_custom_task
from bitbert_jax.data.glue import load_split
from bitbert_jax.data.glue import split_names
from bitbert_jax.data.metrics import compute_metrics
from bitbert_jax.data.tasks import GLUE_TASKS
from bitbert_jax.data.tasks import TaskSpec
from bitbert_jax.data.tasks import custom_task
from bitbert_jax.data.tasks import get_task
from bitbert_jax.data.tokenize import EncodedSplit
from bitbert_jax.data.tokenize import encode
from bitbert_jax.data.tokenize import load_tokenizer
from bitbert_jax.data.augment import augment_texts
from bitbert_jax.data.augment import augmented_split
