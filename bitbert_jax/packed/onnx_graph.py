"""A packed directory -> an ONNX model computing what the JAX packed path computes.

The graph is written by hand with `onnx.helper` (opset 17, which ONNX Runtime CPU and
onnxruntime-web run). Quantized weights are uint8 initializers holding the packed codes of
`bitbert_jax.packed.format` (8 one-bit weights per byte), unpacked inside the graph with BitShift,
Mod and Where; ONNX Runtime folds that unpacking into int8 constants when it loads the model, so
the file stays packed while inference multiplies int8 codes.

A quantized dense layer follows `bitbert_jax.quant.grid` step by step:

  s_x    = 2 max|x| / 2^a per token                     ReduceMax, Mul, Div (exact powers of 2)
  x_code = clip(round_half_even(x * (1 / s_x)), -2^(a-1), 2^(a-1) - 1)
                                                 Reciprocal, Mul, QuantizeLinear (uint8 + 128)
  acc    = x_code . w_code  per K chunk (`grid.chunks`) MatMulInteger (int32), Cast, Add in order
  y      = acc_0 (s_x alpha_0) [+ acc_1 (s_x alpha_1)] + bias           Mul, Add (float32)

Embeddings gather packed rows by id and unpack only those (as `layers.packed_embed`).
LayerNorm, softmax, GELU, tanh, the attention matmuls and the float layers run in the graph's
float precision: float32 (the default, fast) or float64, which `model.PackedModel` computes in
with `precision='float64'`. In float32 the two round exp, erf and the reductions differently,
and a 1-ulp difference moves an activation across a rounding boundary of its 8-bit code
(measured: logits off by up to 0.04 on a trained student, one MRPC label in 408); in float64 such
a crossing is ~1e-9 times as likely. ONNX Runtime has no float64 Erf, so the float64 GELU is
`bitbert_jax.model.gelu_erf`'s formula. Node names start with the parameter path of the layer
they belong to ('encoder/layer_0/attention/query/...'), so tests
can find a layer's MatMulInteger.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bitbert_jax.errors import BitbertError
from bitbert_jax.model import gelu_erf
from bitbert_jax.packed import format as fmt
from bitbert_jax.quant import grid
from bitbert_serve.manifest import INPUTS, OUTPUT  # the names bitbert_serve feeds and reads

OPSET = 17  # LayerNormalization; within what onnxruntime-web and ORT CPU run
IR_VERSION = 8  # the IR of opset 17, readable by older runtimes
ACT_ZERO_POINT = 128  # activation codes travel as uint8 code + 128
F32_MIN = float(np.finfo(np.float32).min)  # masked keys, as the JAX model (and Hugging Face)
_FLOAT_TYPES = {'float64': (np.float64, TensorProto.DOUBLE),
                'float32': (np.float32, TensorProto.FLOAT)}
PRECISIONS = {p: _FLOAT_TYPES[p] for p in fmt.PRECISIONS}


class _Graph:
  """Nodes and initializers under construction; every op returns its output's name."""

  def __init__(self, precision='float32'):
    if precision not in PRECISIONS:
      raise BitbertError(f'ONNX export: precision {precision!r}; valid: {", ".join(PRECISIONS)}')
    self.nodes, self.inits, self._consts, self._count = [], [], {}, 0
    self.np_float, self.float = PRECISIONS[precision]  # the float ops' dtype

  def op(self, op_type, inputs, scope, **attrs):
    self._count += 1
    out = f't{self._count}'  # short value names: the graph's bytes are mostly its weights
    self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                       name=f'{scope}/{op_type}_{self._count}', **attrs))
    return out

  def init(self, name, array):
    array = np.asarray(array)  # not ascontiguousarray: it turns a scalar into shape [1]
    self.inits.append(numpy_helper.from_array(array if array.flags.c_contiguous else
                                              array.copy(), name))
    return name

  def const(self, value, dtype):
    """A small constant (scalar or 1-D), shared by value."""
    arr = np.asarray(value, dtype)
    key = (arr.dtype.str, arr.shape, arr.tobytes())
    if key not in self._consts:
      self._consts[key] = self.init(f'c{len(self._consts)}', arr)
    return self._consts[key]

  def i64(self, *values):
    return self.const(list(values), np.int64)

  def f32(self, value):
    return self.const(value, np.float32)

  def real(self, value):
    """A constant in the graph's float precision."""
    return self.const(value, self.np_float)

  def to_real(self, x, scope):
    """A float32 value cast to the graph's float precision (exact)."""
    return x if self.float == TensorProto.FLOAT else self.op('Cast', [x], scope, to=self.float)

  def index(self, value):
    """A scalar int64 index (Gather with it drops the axis)."""
    return self.const(value, np.int64)


def _reshape_tail(g, x, rank_kept, tail, scope):
  """Reshape keeping the first rank_kept dims (dynamic) and setting the rest to `tail`."""
  return g.op('Reshape', [x, g.i64(*([0] * rank_kept + list(tail)))], scope)


def unpack_codes(g, packed, bits, n, rank, scope, offset=0):
  """uint8 bytes [..., row_bytes] (rank dims) -> int8 codes [..., n], per `fmt.unpack_steps`;
  with an offset, uint8 codes + offset (a zero-point form)."""
  shifts, sign = fmt.unpack_steps(bits)
  u = g.op('Unsqueeze', [packed, g.i64(-1)], scope)
  if shifts is not None:
    fields = g.op('BitShift', [u, g.const(shifts, np.uint8)], scope, direction='RIGHT')
    if bits < 8:
      fields = g.op('Mod', [fields, g.const(2**bits, np.uint8)], scope)
    fields = _reshape_tail(g, fields, rank - 1, [-1], scope)
    width = (n * bits + 7) // 8 * len(shifts)
    fields = g.op('Cast', [fields], scope, to=TensorProto.INT32)
  else:  # codes straddle bytes: expand to the bit stream, regroup `bits` bits LSB first
    stream = g.op('BitShift', [u, g.const(range(8), np.uint8)], scope, direction='RIGHT')
    stream = g.op('Mod', [stream, g.const(2, np.uint8)], scope)
    stream = _reshape_tail(g, stream, rank - 1, [-1], scope)
    stream = g.op('Slice', [stream, g.i64(0), g.i64(n * bits), g.i64(-1)], scope)
    stream = _reshape_tail(g, stream, rank - 1, [n, bits], scope)
    stream = g.op('Cast', [stream], scope, to=TensorProto.INT32)
    weighted = g.op('Mul', [stream, g.const([1 << i for i in range(bits)], np.int32)], scope)
    fields = g.op('ReduceSum', [weighted, g.i64(-1)], scope, keepdims=0)
    width = n
  if width != n:
    fields = g.op('Slice', [fields, g.i64(0), g.i64(n), g.i64(-1)], scope)
  if sign == 'pm1':
    codes = g.op('Sub', [g.op('Mul', [fields, g.const(2, np.int32)], scope),
                         g.const(1, np.int32)], scope)
  else:  # b-bit two's complement: fields >= 2^(b-1) are negative
    negative = g.op('GreaterOrEqual', [fields, g.const(2**(bits - 1), np.int32)], scope)
    codes = g.op('Where', [negative, g.op('Sub', [fields, g.const(2**bits, np.int32)], scope),
                           fields], scope)
  if offset:
    codes = g.op('Add', [codes, g.const(offset, np.int32)], scope)
  return g.op('Cast', [codes], scope, to=TensorProto.UINT8 if offset else TensorProto.INT8)


def _float(g, tensors, name, scope):
  """A stored float tensor as a graph value in the graph's precision (exact casts)."""
  arr = tensors[name]
  g.init(name, arr)
  return name if arr.dtype == g.np_float else g.op('Cast', [name], scope, to=g.float)


def token_codes(g, x, bits, scope):
  """Per-token symmetric codes of x [..., K]: (uint8 codes + 128, scale [..., 1] in the graph's
  precision); the rule of `quantizers.activation_codes` (scale 2 max|x| / 2^bits, round half
  to even, clip).

  The codes go to MatMulInteger as uint8 with zero point 128 (exactly the int8 code): ONNX
  Runtime's fast integer GEMMs take uint8 activations (int8 x int8 ran ~20x slower here).
  """
  amax = g.op('ReduceMax', [g.op('Abs', [x], scope)], scope, axes=[-1], keepdims=1)
  scale = g.op('Div', [g.op('Mul', [amax, g.real(2.0)], scope), g.real(2.0**bits)], scope)
  safe = g.op('Where', [g.op('Equal', [scale, g.real(0.0)], scope), g.real(1.0), scale], scope)
  # x * (1 / s), not x / s: XLA rewrites the division by a broadcast scale into a multiply by
  # its reciprocal, and a code at a half-way point rounds by which of the two is computed.
  # Reciprocal, not Div(1, s): ORT's DivMulFusion turns Div(1, s) * x back into x / s.
  inverse = g.op('Reciprocal', [safe], scope)
  codes = g.op('Mul', [x, inverse], scope)
  if bits < 8 or g.float != TensorProto.FLOAT:
    # Rounded in the graph's precision (QuantizeLinear takes float32 only; rounding a float64
    # to float32 first could land on a half-way point), then exact integers as float32.
    codes = g.op('Round', [codes], scope)
    if bits < 8:
      codes = g.op('Clip', [codes, g.real(-2.0**(bits - 1)), g.real(2.0**(bits - 1) - 1)], scope)
    if g.float != TensorProto.FLOAT:
      codes = g.op('Cast', [codes], scope, to=TensorProto.FLOAT)
  # QuantizeLinear with scale 1 is round half to even, + 128, saturate to [0, 255]: the 8-bit
  # clip to [-128, 127] and the zero-point shift in one op (codes / 1 is exact).
  return g.op('QuantizeLinear', [codes, g.f32(1.0), g.const(ACT_ZERO_POINT, np.uint8)],
              scope), scale


class _Model:
  """Builds the BERT graph from a packed directory's tensors, config and policy."""

  def __init__(self, config, policy, tensors, manifest, precision):
    self.cfg, self.policy, self.t, self.records = config, policy, tensors, manifest['tensors']
    self.g = _Graph(precision)

  def has_codes(self, path):
    return f'{path}{fmt.CODES_SUFFIX}' in self.t

  def dense(self, x, module):
    """x [..., K] float32 -> the layer's output [..., N] float32 (N: its output rows)."""
    g, path = self.g, f'{module}/kernel'
    quant, act = self.policy.weight_quant(path), self.policy.input_quant(path)
    if quant is None:
      if act is not None:
        raise BitbertError(f'ONNX export: {path} is a float weight with quantized inputs; only '
                           f'integer-grid or float layers are supported')
      y = g.op('MatMul', [x, _float(g, self.t, path, module)], module)
    else:
      y = self.integer_dense(x, module, path, quant, act)
    return g.op('Add', [y, _float(g, self.t, f'{module}/bias', module)], module)

  def integer_dense(self, x, module, path, quant, act):
    g = self.g
    codes_name, scale_name = f'{path}{fmt.CODES_SUFFIX}', f'{path}{fmt.SCALE_SUFFIX}'
    rec = self.records[codes_name]
    rows, cols = rec['logical_shape']
    planes, groups = rec['planes'], rec['num_groups']
    if not grid.integer_path(act) or (rows * cols // groups) % cols:
      raise BitbertError(f'ONNX export: {path} is not on the integer grid (activations '
                         f'{act}, {groups} weight groups); the ONNX graph supports dynamic '
                         f'2..8-bit activations and groups of whole output rows')
    g.init(codes_name, self.t[codes_name])
    # 1-2 bit codes as int8 (|w| <= 1: u8 x s8 kernels that add product pairs in int16, as
    # AVX2 without VNNI does, cannot saturate); wider ones as uint8 with a zero point.
    w_zero = 0 if quant.bits <= 2 else 2**(quant.bits - 1)
    w = unpack_codes(g, codes_name, quant.bits, cols, 3 if planes == 2 else 2, module, w_zero)
    w = g.op('Transpose', [g.op('Reshape', [w, g.i64(planes * rows, cols)], module)], module,
             perm=[1, 0])  # [K, P * N]: both planes in one integer matmul
    g.init(scale_name, self.t[scale_name])
    if groups == 1:  # one scale per plane: s_x alpha_p is [..., 1], the same floats per row
      row_scale = g.op('Reshape', [scale_name, g.i64(planes, 1)], module)
    else:
      row_scale = g.op('Reshape', [g.op('Expand', [
          g.op('Reshape', [scale_name, g.i64(planes, groups, 1)], module),
          g.i64(planes, groups, rows // groups)], module), g.i64(planes, rows)], module)
    xc, xs = token_codes(g, x, act.bits, module)
    parts, k_chunks = [], grid.chunks(cols, act.bits, quant.bits)
    # One chunk: int32 straight to the graph's float (exact); more: float32 sums, as grid.
    acc_type = g.float if len(k_chunks) == 1 else TensorProto.FLOAT
    for lo, hi in k_chunks:
      xk, wk = xc, w
      if hi - lo != cols:
        xk = g.op('Slice', [xc, g.i64(lo), g.i64(hi), g.i64(-1)], module)
        wk = g.op('Slice', [w, g.i64(lo), g.i64(hi), g.i64(0)], module)
      zeros = [g.const(ACT_ZERO_POINT, np.uint8)] + ([g.const(w_zero, np.uint8)] if w_zero else [])
      acc = g.op('MatMulInteger', [xk, wk] + zeros, module)
      parts.append(g.op('Cast', [acc], module, to=acc_type))  # exact: |acc| <= 2^24
    acc = parts[0]
    for part in parts[1:]:  # chunk sums added left to right, as grid.add_chunks
      acc = g.op('Add', [acc, part], module)
    acc = g.to_real(acc, module)
    y = None
    for p in range(planes):
      acc_p = acc if planes == 1 else g.op(
          'Slice', [acc, g.i64(p * rows), g.i64((p + 1) * rows), g.i64(-1)], module)
      alpha = g.to_real(g.op('Gather', [row_scale, g.index(p)], module, axis=0), module)
      # Expand (a no-op on values) keeps ORT's MatMulIntegerToFloat fusion away: the fused
      # kernel takes a per-tensor activation scale and would drop the per-token one.
      scale = g.op('Mul', [xs, alpha], module)
      scale = g.op('Expand', [scale, g.op('Shape', [scale], module)], module)
      term = g.op('Mul', [acc_p, scale], module)
      y = term if y is None else g.op('Add', [y, term], module)
    return y

  def layer_norm(self, x, module):
    g = self.g
    return g.op('LayerNormalization', [x, _float(g, self.t, f'{module}/scale', module),
                                       _float(g, self.t, f'{module}/bias', module)],
                module, axis=-1, epsilon=float(self.cfg.layer_norm_eps))

  def word_embeddings(self, ids):
    g, module = self.g, 'embeddings/word_embeddings'
    path = f'{module}/embedding'
    if not self.has_codes(path):
      return g.op('Gather', [_float(g, self.t, path, module), ids], module, axis=0)
    return g.to_real(self.packed_word_embeddings(ids, path, module), module)

  def packed_word_embeddings(self, ids, path, module):
    """float32 [B, S, H]: codes times scales in float32, as `layers.packed_embed`."""
    g = self.g
    codes_name, scale_name = f'{path}{fmt.CODES_SUFFIX}', f'{path}{fmt.SCALE_SUFFIX}'
    rec = self.records[codes_name]
    rows, cols = rec['logical_shape']
    split, groups = rec['planes'] == 2, rec['num_groups']
    size = rows * cols // groups
    if size % cols:
      raise BitbertError(f'ONNX export: {path} has weight groups that split a row ({groups} '
                         f'groups of {size}); export supports whole rows per group')
    axis = 1 if split else 0
    g.init(codes_name, self.t[codes_name])
    g.init(scale_name, self.t[scale_name])
    picked = g.op('Gather', [codes_name, ids], module, axis=axis)  # [P?, B, S, row_bytes]
    values = unpack_codes(g, picked, rec['bits'], cols, 4 if split else 3, module)
    values = g.op('Cast', [values], module, to=TensorProto.FLOAT)
    group_ids = ids if size // cols == 1 else g.op('Div', [ids, g.i64(size // cols)], module)
    scale = g.op('Gather', [scale_name, group_ids], module, axis=axis)
    w = g.op('Mul', [values, g.op('Unsqueeze', [scale, g.i64(-1)], module)], module)
    if split:  # planes added in order, as the JAX sum over the plane axis
      w = g.op('Add', [g.op('Gather', [w, g.index(0)], module, axis=0),
                       g.op('Gather', [w, g.index(1)], module, axis=0)], module)
    return w

  def activation(self, h, scope):
    g, name = self.g, self.cfg.hidden_act
    if name == 'relu':
      return g.op('Relu', [h], scope)
    if name == 'gelu' and g.float != TensorProto.FLOAT:
      return self.gelu_erf(h, scope)
    if name == 'gelu':  # exact, x (1 + erf(x / sqrt 2)) 0.5: the form ORT fuses into one Gelu
      cdf = g.op('Add', [g.op('Erf', [g.op('Div', [h, g.real(np.sqrt(2.0))], scope)], scope),
                         g.real(1.0)], scope)
      return g.op('Mul', [g.op('Mul', [h, cdf], scope), g.real(0.5)], scope)
    # tanh approximation ('gelu_new', 'gelu_pytorch_tanh')
    cube = g.op('Mul', [g.real(0.044715), g.op('Mul', [h, g.op('Mul', [h, h], scope)], scope)],
                scope)
    inner = g.op('Mul', [g.real(np.sqrt(2 / np.pi)), g.op('Add', [h, cube], scope)], scope)
    cdf = g.op('Add', [g.real(1.0), g.op('Tanh', [inner], scope)], scope)
    return g.op('Mul', [g.op('Mul', [g.real(0.5), h], scope), cdf], scope)

  def gelu_erf(self, h, scope):
    """`gelu_erf.gelu`, op for op: ONNX Runtime has no float64 Erf."""
    g = self.g
    mul = lambda a, b: g.op('Mul', [a, b], scope)
    add = lambda a, b: g.op('Add', [a, b], scope)
    z = mul(h, g.real(gelu_erf.SQRT_HALF))
    a = g.op('Abs', [z], scope)
    t = g.op('Div', [g.real(1.0), add(g.real(1.0), mul(g.real(gelu_erf.P), a))], scope)
    poly = g.real(gelu_erf.A[4])
    for c in reversed(gelu_erf.A[:4]):
      poly = add(mul(poly, t), g.real(c))
    e = mul(mul(poly, t), g.op('Exp', [g.op('Neg', [mul(a, a)], scope)], scope))
    erf = mul(g.op('Sign', [z], scope), g.op('Sub', [g.real(1.0), e], scope))
    return mul(mul(h, add(erf, g.real(1.0))), g.real(0.5))

  def attention(self, x, mask_bias, i):
    g, cfg = self.g, self.cfg
    scope = f'encoder/layer_{i}/attention'
    heads, d = cfg.num_attention_heads, cfg.head_dim
    proj = lambda name: _reshape_tail(g, self.dense(x, f'{scope}/{name}'),
                                      2, [heads, d], scope)
    q = g.op('Transpose', [proj('query')], scope, perm=[0, 2, 1, 3])  # [B, N, S, D]
    k = g.op('Transpose', [proj('key')], scope, perm=[0, 2, 3, 1])  # [B, N, D, S]
    v = g.op('Transpose', [proj('value')], scope, perm=[0, 2, 1, 3])
    scores = g.op('Div', [g.op('MatMul', [q, k], scope), g.real(np.sqrt(g.np_float(d)))], scope)
    probs = g.op('Softmax', [g.op('Add', [scores, mask_bias], scope)], scope, axis=-1)
    context = g.op('Transpose', [g.op('MatMul', [probs, v], scope)], scope, perm=[0, 2, 1, 3])
    context = _reshape_tail(g, context, 2, [heads * d], scope)
    out = self.dense(context, f'{scope}/output')
    return self.layer_norm(g.op('Add', [out, x], scope), f'{scope}/LayerNorm')

  def build(self):
    g, cfg = self.g, self.cfg
    if cfg.dtype != 'float32':
      raise BitbertError(f'ONNX export: compute dtype {cfg.dtype}; the graph computes float32')
    if not cfg.num_labels:
      raise BitbertError('ONNX export: the model has no classification head (num_labels = 0)')
    ids, mask, types = INPUTS
    words = self.word_embeddings(ids)
    seq = g.op('Gather', [g.op('Shape', [ids], 'embeddings'), g.i64(1)], 'embeddings', axis=0)
    pos_table = _float(g, self.t, 'embeddings/position_embeddings/embedding', 'embeddings')
    pos = g.op('Slice', [pos_table, g.i64(0), seq, g.i64(0)], 'embeddings')
    type_table = _float(g, self.t, 'embeddings/token_type_embeddings/embedding', 'embeddings')
    emb = g.op('Add', [g.op('Add', [words, pos], 'embeddings'),
                       g.op('Gather', [type_table, types], 'embeddings', axis=0)], 'embeddings')
    x = self.layer_norm(emb, 'embeddings/LayerNorm')
    keep = g.op('Greater', [mask, g.const(0, np.int64)], 'mask')
    bias = g.op('Where', [keep, g.real(0.0), g.real(F32_MIN)], 'mask')
    bias = g.op('Unsqueeze', [bias, g.i64(1, 2)], 'mask')  # [B, 1, 1, S]
    for i in range(cfg.num_hidden_layers):
      x = self.attention(x, bias, i)
      scope = f'encoder/layer_{i}'
      h = self.activation(self.dense(x, f'{scope}/intermediate'), scope)
      out = self.dense(h, f'{scope}/output')
      x = self.layer_norm(g.op('Add', [out, x], scope), f'{scope}/output_LayerNorm')
    first = g.op('Gather', [x, g.index(0)], 'pooler', axis=1)  # [B, H]: the [CLS] token
    pooled = g.op('Tanh', [self.dense(first, 'pooler')], 'pooler')
    logits = self.dense(pooled, 'classifier')
    if g.float != TensorProto.FLOAT:
      logits = g.op('Cast', [logits], 'classifier', to=TensorProto.FLOAT)  # as predict returns
    g.nodes.append(helper.make_node('Identity', [logits], [OUTPUT], name='logits'))
    dims = ['batch', 'sequence']
    graph = helper.make_graph(
        g.nodes, 'bitbert', [helper.make_tensor_value_info(n, TensorProto.INT64, dims)
                             for n in INPUTS],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ['batch', cfg.num_labels])],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)],
                              producer_name='bitbert_jax', ir_version=IR_VERSION)
    return model


def build(config, policy, tensors, manifest, precision='float32'):
  """ModelProto of a packed model.

  config: BertConfig; policy: its QuantPolicy; tensors: {name: numpy array} of the packed
  weights file (state tensors refused: static activation ranges are not on the integer grid);
  manifest: the packed directory's manifest.json content.
  precision: of the float ops, 'float32' (fast; logits within ~0.04 of predict's) or
    'float64' (what `predict(precision='float64')` computes: bit-identical logits measured).
  """
  state = [n for n in tensors if fmt.STATE_SEP in n]
  if state:
    raise BitbertError(f'ONNX export: the packed model carries state tensors ({state[0]}, ...) '
                       f'of static activation ranges; only dynamic activations are exported')
  model = _Model(config, policy, tensors, manifest, precision).build()
  onnx.checker.check_model(model)
  return model
