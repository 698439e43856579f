"""Bad input raises a clear ValueError/TypeError naming the argument, at trace time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import make_problem

P, XS, Y = make_problem(0, T=4, B=2, D=3, hidden=(5, 4), O=2)
CLS = jnp.zeros((4, 2), jnp.int32)


@pytest.mark.parametrize("fn", [jaxrnn.bptt, jaxrnn.autodiff_bptt, jaxrnn.loss])
@pytest.mark.parametrize("call,exc,words", [
    (lambda f: f(P, XS[0], Y), ValueError, ["xs", "rank 3", "(2, 3)"]),
    (lambda f: f(P, jnp.ones((4, 2, 7)), Y), ValueError, ["xs", "D = 7", "D = 3"]),
    (lambda f: f(P, XS, Y, h0=(jnp.zeros((2, 5)),)), ValueError, ["h0", "2 arrays", "length 1"]),
    (lambda f: f(P, XS, Y, h0=(jnp.zeros((2, 5)), jnp.zeros((3, 4)))), ValueError,
     ["h0[1]", "(2, 4)", "(3, 4)"]),
    (lambda f: f(P, XS, Y[:, :, :1]), ValueError, ["targets", "(4, 2, 2)", "(4, 2, 1)"]),
    (lambda f: f(P, XS, Y, many_to_one=True), ValueError, ["targets", "(2, 2)", "(4, 2, 2)"]),
    (lambda f: f(P, XS, CLS.astype(jnp.float64), loss="xent"), TypeError, ["targets", "integer"]),
    (lambda f: f(P, XS, Y, loss="hinge"), ValueError, ["loss", "'hinge'", "mse"]),
    (lambda f: f(P._replace(activation="gelu"), XS, Y), ValueError, ["activation", "'gelu'"]),
    (lambda f: f(P, jnp.ones((0, 2, 3)), Y[:0]), ValueError, ["xs", "T >= 1", "(0, 2, 3)"]),
    (lambda f: f(P, jnp.ones((4, 2, 3), jnp.int32), Y), TypeError, ["xs", "floating", "int32"]),
])
def test_bad_input(fn, call, exc, words):
  with pytest.raises(exc) as info:
    call(fn)
  for w in words:
    assert w in str(info.value), (w, str(info.value))


def test_bad_input_under_jit_raises_at_trace_time():
  f = jax.jit(lambda x: jaxrnn.bptt(P, x, Y))
  with pytest.raises(ValueError, match="xs has input size D = 7"):
    f.lower(jax.ShapeDtypeStruct((4, 2, 7), jnp.float64))


@pytest.mark.parametrize("fn,option,value", [
    (jaxrnn.bptt, "tau_max", 2), (jaxrnn.bptt, "tau_b", 1), (jaxrnn.bptt, "unroll", 2),
    (jaxrnn.bptt, "checkpoint_every", 2), (jaxrnn.bptt, "fused", False),
    (jaxrnn.bptt, "return_dh0", True), (jaxrnn.autodiff_bptt, "return_dh0", True),
    (jaxrnn.autodiff_bptt, "tau_max", 2),
    (jaxrnn.loss, "many_to_one", False), (jaxrnn.backward_deltas, "tau_max", 2),
])
def test_a_static_option_passed_through_jit_says_how_to_mark_it_static(fn, option, value):
  # jax.jit traces every keyword argument unless it is named static.
  with pytest.raises(TypeError) as info:
    jax.jit(fn)(P, XS, Y, **{option: value})
  for w in (option, "static option", "traced", f"static_argnames=({option!r},)"):
    assert w in str(info.value), (w, str(info.value))
  jax.jit(fn, static_argnames=option)(P, XS, Y, **{option: value})  # the remedy works


@pytest.mark.parametrize("fn", [jaxrnn.bptt, jaxrnn.autodiff_bptt, jaxrnn.backward_deltas,
                                jaxrnn.loss, lambda p, x, y: jaxrnn.forward(p, x)])
@pytest.mark.parametrize("fields", [lambda p: p._asdict(), tuple])
def test_params_of_the_right_fields_but_not_an_rnnparams_are_named(fn, fields):
  # A dict or tuple of the fields holds the activation name, a string, that the
  # functions' jax.jit refused with an error about abstract arrays.
  with pytest.raises(TypeError) as info:
    fn(fields(P), XS, Y)
  for w in ("params must be an RNNParams", type(fields(P)).__name__, "RNNParams(**d)"):
    assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("params,words", [
    (P._replace(readout=P.readout._replace(b_y=None)), ["params.readout.b_y", "array", "None"]),
    (P._replace(layers=(P.layers[0]._replace(W_hh=None), P.layers[1])),
     ["params.layers[0].W_hh", "array", "None"]),
    (P._replace(layers=list(P.layers)), ["params.layers", "tuple", "list of length 2"]),
])
def test_params_fields_that_are_not_arrays_are_named(params, words):
  with pytest.raises((TypeError, ValueError)) as info:
    jaxrnn.bptt(params, XS, Y)
  for w in words:
    assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("fn", [jaxrnn.bptt, jaxrnn.autodiff_bptt])
def test_return_dh0_must_be_a_bool(fn):
  # It picks the number of results: a truthy string must not pass for True.
  with pytest.raises(TypeError, match=r"return_dh0 must be a bool; got 'yes' \(str\)"):
    fn(P, XS, Y, return_dh0="yes")
  with pytest.raises(TypeError, match="return_dh0 must be a bool; got None"):
    jaxrnn.validate_inputs(P, XS, Y, return_dh0=None)
  assert len(fn(P, XS, Y, return_dh0=np.bool_(True))) == 3


@pytest.mark.parametrize("kwargs,words", [
    (dict(hidden_sizes=()), ["hidden_sizes", "()"]),
    (dict(hidden_sizes=(4, 0)), ["hidden_sizes[1]", "0"]),
    (dict(hidden_sizes=(4,), activation="softplus"), ["activation", "'softplus'"]),
    (dict(hidden_sizes=(4,), output_size=-1), ["output_size", "-1"]),
    # not an int nor a sequence of them (a float, a 0-d array, a string, None): named,
    # instead of Python's "not iterable"
    (dict(hidden_sizes=4.0), ["hidden_sizes", "positive int or a sequence", "4.0 (float)"]),
    (dict(hidden_sizes=np.array(4)), ["hidden_sizes", "array(4) (ndarray)"]),
    (dict(hidden_sizes="16"), ["hidden_sizes", "'16' (str)"]),
    (dict(hidden_sizes=None), ["hidden_sizes", "None (NoneType)"]),
])
def test_bad_init(kwargs, words):
  with pytest.raises(ValueError) as info:
    jaxrnn.init_params(jax.random.key(0), 3, **kwargs)
  for w in words:
    assert w in str(info.value)


def test_init_takes_one_key_and_any_integer_sizes():
  for key in (0, jax.random.split(jax.random.key(0), 2), jnp.zeros((3,), jnp.uint32)):
    with pytest.raises(TypeError, match="key must be one PRNG key"):
      jaxrnn.init_params(key, 3, (4,))
  a = jaxrnn.init_params(jax.random.key(0), np.int64(3), np.array([4, 2]), np.int32(2))
  b = jaxrnn.init_params(jax.random.key(0), 3, (4, 2), 2)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match=r"input_size must be a positive int; got 3.0 \(float\)"):
    jaxrnn.init_params(jax.random.key(0), 3.0, (4,))


def test_forward_bad_input():
  with pytest.raises(ValueError, match="xs must have shape"):
    jaxrnn.forward(P, XS[0])
  with pytest.raises(TypeError, match="params must be an RNNParams"):
    jaxrnn.forward({"W": 1}, XS)


@pytest.mark.parametrize("args,exc,words", [
    (lambda l: (l, jnp.zeros((2, 5)), jnp.zeros((2, 4))), ValueError,
     ["x", "[B, D] = (2, 3)", "(2, 4)"]),
    (lambda l: (l, jnp.zeros((5,)), jnp.zeros((3,))), ValueError, ["h", "[B, H]", "H = 5", "(5,)"]),
    (lambda l: (l, jnp.zeros((2, 4)), jnp.zeros((2, 3))), ValueError, ["h", "H = 5", "(2, 4)"]),
    (lambda l: (l._replace(b_h=jnp.zeros(4)), jnp.zeros((2, 5)), jnp.zeros((2, 3))), ValueError,
     ["layer", "b_h [H]", "(4,)"]),
    (lambda l: (tuple(l), jnp.zeros((2, 5)), jnp.zeros((2, 3))), TypeError, ["layer", "tuple"]),
    (lambda l: (l, jnp.zeros((2, 5)), jnp.zeros((2, 3), jnp.int32)), TypeError,
     ["x must have a floating dtype", "int32"]),
    (lambda l: (l, jnp.zeros((2, 5), bool), jnp.zeros((2, 3))), TypeError,
     ["h must have a floating dtype", "bool"]),
])
def test_elman_step_bad_input(args, exc, words):
  with pytest.raises(exc) as info:
    jax.jit(jaxrnn.elman_step).lower(*args(P.layers[0]))
  for w in words:
    assert w in str(info.value), (w, str(info.value))
  with pytest.raises(ValueError, match="activation"):
    jaxrnn.elman_step(P.layers[0], jnp.zeros((2, 5)), jnp.zeros((2, 3)), activation="gelu")


def test_elman_step_casts_floating_inputs_to_the_layers_dtype():
  # as bptt casts xs and h0; under strict promotion a float32 h met float64 weights
  h, out = jax.jit(jaxrnn.elman_step)(P.layers[0], jnp.zeros((2, 5), jnp.float32),
                                      [[1.0] * 3] * 2)   # a list reaches jit as tracers
  assert h.dtype == out.dtype == P.layers[0].W_hh.dtype == jnp.float64


def _forward(params, xs, targets, *, loss_weights, **kw):
  return jaxrnn.forward(params, xs, **kw)


@pytest.mark.parametrize("fn", [jaxrnn.bptt, jaxrnn.autodiff_bptt, jaxrnn.loss,
                                jaxrnn.backward_deltas, _forward])
def test_array_arguments_may_be_nested_lists(fn):
  """Lists reach the jitted functions as lists of tracers; they must act as their arrays."""
  lengths, weights = [4, 3], np.linspace(0.5, 1.0, 8).reshape(4, 2)
  resets = np.zeros((4, 2), bool)
  resets[2, 1] = True
  h0 = (np.full((2, 5), 0.1), np.full((2, 4), -0.2))
  as_arrays = fn(P, XS, Y, lengths=jnp.array(lengths), loss_weights=jnp.asarray(weights),
                 resets=jnp.asarray(resets), h0=tuple(map(jnp.asarray, h0)))
  as_lists = fn(P, np.asarray(XS).tolist(), np.asarray(Y).tolist(), lengths=lengths,
                loss_weights=weights.tolist(), resets=resets.tolist(),
                h0=[h.tolist() for h in h0])
  jax.tree.map(np.testing.assert_array_equal, as_lists, as_arrays)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(lengths=[4, [3]]), TypeError, ["lengths", "nested list"]),
    (dict(h0=jnp.zeros((2, 5))), ValueError, ["h0", "2 arrays", "one array of shape (2, 5)"]),
    (dict(h0=(None, None)), ValueError, ["h0[0]", "(2, 5)", "got None"]),
])
def test_bad_array_like_arguments(kwargs, exc, words):
  with pytest.raises(exc) as info:
    jaxrnn.bptt(P, XS, Y, **kwargs)
  for w in words:
    assert w in str(info.value), (w, str(info.value))


def test_symbolic_shapes_export_autodiff_and_get_a_clear_error_elsewhere():
  """jax.export with symbolic T and B: forward, loss and untruncated autodiff_bptt
  export (and agree with the concrete call); the hand-written pass, which lays out its
  loops from T and B, and truncation, which lays out windows from T, say so by name."""
  from jax import export
  T, B = export.symbolic_shape("T, B")
  spec = lambda *tail: jax.ShapeDtypeStruct((T, B) + tail, jnp.float64)
  exported = export.export(jax.jit(lambda p, x, y: jaxrnn.autodiff_bptt(p, x, y)))(
      P, spec(3), spec(2))
  jax.tree.map(np.testing.assert_array_equal, exported.call(P, XS, Y),
               jaxrnn.autodiff_bptt(P, XS, Y))
  for fn, words in [(jaxrnn.bptt, ["needs concrete T and B", "symbolic T, B"]),
                    (jaxrnn.backward_deltas, ["needs concrete T and B"]),
                    (lambda p, x, y: jaxrnn.autodiff_bptt(p, x, y, tau_max=2),
                     ["truncation (tau_max=2) needs a concrete sequence length"])]:
    with pytest.raises(TypeError) as info:
      export.export(jax.jit(fn))(P, spec(3), spec(2))
    for w in words:
      assert w in str(info.value), (w, str(info.value))
