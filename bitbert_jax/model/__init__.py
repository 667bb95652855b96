"""The Flax BERT: modules, config and output container. Knows nothing of training or files."""
from bitbert_jax.model.bert import BertModel, BertOutput, init_params
from bitbert_jax.model.config import BertConfig
