"""BERT hyper-parameters, convertible to and from a Hugging Face `config.json`."""
import dataclasses
import json

from bitbert_jax.errors import BitbertError

ACTIVATIONS = ('gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu')
PROBLEM_TYPES = ('single_label_classification', 'regression')
# float64: packed inference on CPU under jax.enable_x64 (`predict --precision=float64`), the
# precision of the ONNX graph exported with --precision=float64, so that the two agree to ~1e-12
# instead of flipping 8-bit activation codes.
TRAIN_DTYPES = ('float32', 'bfloat16')  # what config.model.dtype may say
DTYPES = TRAIN_DTYPES + ('float64',)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of one BERT. num_labels = 0: no classification head."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  # 0: hidden_size // num_attention_heads (Hugging Face's rule); another size makes a narrow
  # model (fewer heads than hidden_size / head size), which Hugging Face's BertModel cannot hold.
  attention_head_size: int = 0
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  num_labels: int = 0
  problem_type: str = 'single_label_classification'
  classifier_dropout: float | None = None
  label_names: tuple[str, ...] = ()
  dtype: str = 'float32'  # compute dtype; parameters are always float32
  remat: bool = False  # rematerialise each layer in the backward pass (memory for compute)

  def __post_init__(self):
    size = self.attention_head_size
    if not isinstance(size, int) or size < 0:
      raise BitbertError(f'model config: attention_head_size {size!r}; need an integer >= 1 '
                         '(0: hidden_size // num_attention_heads)')
    if size and size * self.num_attention_heads == self.hidden_size:
      object.__setattr__(self, 'attention_head_size', 0)  # the default, spelled one way
    elif not size and self.hidden_size % self.num_attention_heads:
      raise BitbertError(f'model config: hidden_size {self.hidden_size} is not a multiple of '
                         f'num_attention_heads {self.num_attention_heads}')
    if self.hidden_act not in ACTIVATIONS:
      raise BitbertError(f'model config: hidden_act {self.hidden_act!r} not supported; valid: '
                         f'{", ".join(ACTIVATIONS)}')
    if self.problem_type not in PROBLEM_TYPES:
      raise BitbertError(f'model config: problem_type {self.problem_type!r}; valid: '
                         f'{", ".join(PROBLEM_TYPES)}')
    if self.dtype not in DTYPES:
      raise BitbertError(f'model config: dtype {self.dtype!r}; valid: {", ".join(DTYPES)}')

  @property
  def head_dim(self):
    return self.attention_head_size or self.hidden_size // self.num_attention_heads

  @property
  def attention_width(self):
    """Features of the query, key and value projections: heads x head size."""
    return self.num_attention_heads * self.head_dim

  @property
  def is_regression(self):
    return self.problem_type == 'regression'

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  def to_dict(self):
    """The fields; attention_head_size only when it is not the default (0)."""
    d = dataclasses.asdict(self)
    if not d['attention_head_size']:
      del d['attention_head_size']
    return d

  @classmethod
  def from_dict(cls, d):
    names = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k in names}
    if 'label_names' in d:
      d['label_names'] = tuple(d['label_names'])
    return cls(**d)

  @classmethod
  def from_hf_dict(cls, hf, source='config.json'):
    """From a Hugging Face BERT config dict; unknown keys are ignored."""
    if hf.get('model_type', 'bert') != 'bert':
      raise BitbertError(f'{source}: model_type {hf.get("model_type")!r} is not "bert"')
    if hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise BitbertError(f'{source}: position_embedding_type '
                         f'{hf["position_embedding_type"]!r} not supported; valid: absolute')
    id2label = hf.get('id2label') or {}
    has_head = any(a.endswith('ForSequenceClassification') for a in hf.get('architectures') or [])
    num_labels = len(id2label) if has_head else 0
    label_names = tuple(id2label[k] for k in sorted(id2label, key=int)) if has_head else ()
    kw = {f.name: hf[f.name] for f in dataclasses.fields(cls)
          if f.name in hf and f.name not in ('num_labels', 'label_names', 'problem_type', 'dtype')}
    problem = hf.get('problem_type') or 'single_label_classification'
    return cls(**kw, num_labels=num_labels, label_names=label_names,
               problem_type='regression' if problem == 'regression' else
               'single_label_classification')

  def to_hf_dict(self):
    """A config.json that transformers' BertForSequenceClassification (or BertModel) loads."""
    if self.attention_head_size:
      raise BitbertError(
          f'model config: {self.num_attention_heads} attention heads of size '
          f'{self.attention_head_size} ({self.attention_width} features, hidden_size '
          f'{self.hidden_size}): Hugging Face\'s BertModel derives the head size as hidden_size / '
          'num_attention_heads and cannot hold this narrow model; export it packed '
          '(bitbert_jax.export) or as a saved student instead')
    skip = ('num_labels', 'label_names', 'problem_type', 'dtype', 'remat', 'classifier_dropout')
    hf = {k: v for k, v in self.to_dict().items() if k not in skip}
    hf.update(model_type='bert', position_embedding_type='absolute', initializer_range=0.02,
              classifier_dropout=self.classifier_dropout)
    if self.num_labels:
      names = self.label_names or tuple(f'LABEL_{i}' for i in range(self.num_labels))
      hf.update(architectures=['BertForSequenceClassification'], problem_type=self.problem_type,
                id2label={str(i): n for i, n in enumerate(names)},
                label2id={n: i for i, n in enumerate(names)})
    else:
      hf['architectures'] = ['BertModel']
    return hf

  def to_json(self):
    return json.dumps(self.to_dict(), indent=2)
