"""Tests for adm_jax.sharding on 8 fake CPU devices (see conftest.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from adm_jax import sharding
from adm_jax import tree


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8


def _mesh(data=2, fsdp=4, tensor=1):
  return sharding.make_mesh([("data", data), ("fsdp", fsdp), ("tensor", tensor)])


def _specs(shardings) -> dict:
  return {k: tuple(v.spec) for k, v in tree.flatten(shardings).items()}


def _shapes(**shapes):
  """A plain dict "state" of ShapeDtypeStructs."""
  return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


# --- mesh ---------------------------------------------------------------------------


def test_mesh_fills_minus_one_and_adds_missing_axes():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh([("data", -1)]).shape) == {
      "data": 8, "fsdp": 1, "tensor": 1}


def test_mesh_from_mapping_and_configdict_uses_canonical_order():
  cfg = ml_collections.ConfigDict({"mesh": {"tensor": 2, "fsdp": -1, "data": 2}})
  mesh = sharding.make_mesh(cfg.mesh)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_mesh_uses_given_devices():
  mesh = sharding.make_mesh([("fsdp", -1)], devices=jax.devices()[:4])
  assert mesh.shape["fsdp"] == 4 and mesh.devices.size == 4


@pytest.mark.parametrize("axes, match", [
    ([("data", -1), ("fsdp", 3)], "3.*does not divide the 8"),
    ([("data", 2), ("fsdp", 2)], "multiply to 4, but there are 8"),
    ([("data", -1), ("fsdp", -1)], "only one axis may be -1"),
    ([("data", -1), ("model", 2)], "unknown mesh axes"),
    ([("data", -1), ("data", 2)], "repeat"),
    ([("data", 0), ("fsdp", -1)], "size 0"),
])
def test_mesh_errors(axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(axes)


# --- rules --------------------------------------------------------------------------


def test_first_matching_rule_wins():
  state = _shapes(**{"a.kernel": (8, 16), "b.kernel": (8, 16)})
  rules = [(r"a\..*", "replicate"), (r".*kernel", "fsdp"), (r".*", "fsdp")]
  specs = _specs(sharding.infer_param_shardings(state, rules, _mesh()))
  assert specs == {"a.kernel": (None, None), "b.kernel": (None, "fsdp")}


def test_regex_must_match_the_whole_path():
  state = _shapes(**{"up.kernel": (8,)})
  specs = _specs(sharding.infer_param_shardings(
      state, [("kernel", "fsdp"), (".*", "replicate")], _mesh()))
  assert specs == {"up.kernel": (None,)}


def test_fsdp_picks_largest_divisible_dim_else_replicates():
  state = _shapes(conv=(3, 3, 6, 12), lin=(16, 6), odd=(3, 5), small=(4, 1024))
  specs = _specs(sharding.infer_param_shardings(state, [(".*", "fsdp")], _mesh()))
  assert specs == {
      "conv": (None, None, None, "fsdp"),   # 12 divisible by 4, 6 is not
      "lin": ("fsdp", None),
      "odd": (None, None),                  # nothing divisible: replicated
      "small": (None, "fsdp"),
  }


def test_fsdp_parametrised_axis_and_min_size():
  state = _shapes(big=(1024, 512), tiny=(8, 8))   # 2 MiB and 256 B
  rules = [(".*", 'fsdp(axis=("data", "fsdp"), min_size_mb=1)')]
  specs = _specs(sharding.infer_param_shardings(state, rules, _mesh()))
  assert specs == {"big": (("data", "fsdp"), None), "tiny": (None, None)}


def test_explicit_specs_and_shard_dim_tuples():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  state = _shapes(conv=(3, 3, 4, 8), proj=(8, 16), vec=(16,), other=(4, 4))
  rules = [
      ("conv", (None, None, None, "tensor")),
      ("proj", ("shard_dim", -1, "tensor")),
      ("vec", P(("data", "fsdp"))),
      ("other", 'spec("tensor")|fsdp'),
  ]
  specs = _specs(sharding.infer_param_shardings(state, rules, mesh))
  assert specs == {
      "conv": (None, None, None, "tensor"),
      "proj": (None, "tensor"),
      "vec": (("data", "fsdp"),),
      "other": ("tensor", "fsdp"),
  }


def test_rules_from_configdict():
  cfg = ml_collections.ConfigDict()
  cfg.rules = [(".*norm.*", "replicate"), (".*", 'fsdp(min_size_mb=0)')]
  state = _shapes(**{"norm.scale": (8,), "w": (8, 4)})
  specs = _specs(sharding.infer_param_shardings(state, cfg.rules, _mesh()))
  assert specs == {"norm.scale": (None,), "w": ("fsdp", None)}


def test_unmatched_parameter_names_its_path():
  state = _shapes(**{"enc.kernel": (8, 8), "dec.kernel": (8, 8)})
  with pytest.raises(ValueError, match=r"dec\.kernel"):
    sharding.infer_param_shardings(state, [(r"enc\..*", "fsdp")], _mesh())


@pytest.mark.parametrize("rule, match", [
    ((None, "fsdp"), "cannot be split"),            # 6 % 4
    ("shard_dim(5)", "shard_dim"),
    ("nosuchop", "unknown sharding op"),
    ("fsdp(axis=", "cannot parse"),
    ("fsdp(bad_kw=1)", "bad arguments"),
    ('spec("tensor", None, None)', "more entries"),
    ("fsdp|replicate", "'replicate' after"),
])
def test_bad_rules_raise(rule, match):
  state = _shapes(w=(8, 6))
  with pytest.raises(ValueError, match=match):
    sharding.infer_param_shardings(state, [(".*", rule)], _mesh())


# --- NNX models ---------------------------------------------------------------------

LOGICAL_RULES = [("embed", "fsdp"), ("mlp", "tensor"), ("batch", None)]


class _Annotated(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(8, 16, rngs=rngs,
                         kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros,
                                                         ("mlp",)))
    self.down = nnx.Linear(16, 8, rngs=rngs)   # no annotation


def test_logical_rules_on_annotated_nnx_model():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  # flax 0.12 shards annotated variables at creation: that needs a mesh and rules.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
    model = _Annotated(nnx.Rngs(0))
    abstract = nnx.state(nnx.eval_shape(lambda: _Annotated(nnx.Rngs(0))))
  rules = [(r".*", "logical|fsdp")]
  for state in (nnx.state(model), abstract):
    specs = _specs(sharding.infer_param_shardings(
        state, rules, mesh, logical_axis_rules=LOGICAL_RULES))
    assert specs == {
        "up.kernel": ("fsdp", "tensor"),
        "up.bias": ("tensor",),
        "down.kernel": ("fsdp", None),   # not annotated: the fsdp op
        "down.bias": ("fsdp",),
    }
  # Our specs agree with the ones flax gave the eagerly sharded arrays.
  assert model.up.kernel[...].sharding.spec == P("fsdp", "tensor")


def test_logical_rules_from_mapping_and_unknown_name():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  with nnx.use_eager_sharding(False):
    state = nnx.state(nnx.eval_shape(lambda: _Annotated(nnx.Rngs(0))))
  specs = _specs(sharding.infer_param_shardings(
      state, [(".*", "logical")], mesh, logical_axis_rules={"embed": None,
                                                            "mlp": ("fsdp", "tensor")}))
  assert specs["up.kernel"] == (None, ("fsdp", "tensor"))
  assert specs["down.kernel"] == (None, None)
  with pytest.raises(ValueError, match=r"up\.kernel.*'embed'"):
    sharding.infer_param_shardings(state, [(".*", "logical")], mesh,
                                   logical_axis_rules=[("mlp", "tensor")])


class _ConvMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(4, 16, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):                           # [B, H, W, 4]
    h = jax.nn.gelu(self.conv(x)).mean(axis=(1, 2))  # [B, 16]
    return self.fc2(jax.nn.gelu(self.fc1(h)))        # [B, 8]


def test_fsdp_sharded_forward_matches_unsharded():
  mesh = _mesh(data=2, fsdp=4)
  model = _ConvMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 4))
  want = model(x)

  shardings = sharding.infer_param_shardings(state, [(".*", "fsdp")], mesh)
  params = sharding.shard_params(state, shardings)
  kernel = params["conv"]["kernel"][...]
  assert kernel.sharding.spec == P(None, None, None, "fsdp")
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 4, 4)}
  assert params["fc1"]["kernel"][...].sharding.spec == P(None, "fsdp")
  assert params["fc2"]["kernel"][...].sharding.spec == P("fsdp", None)
  assert {s.data.shape for s in params["fc2"]["kernel"][...].addressable_shards} == {
      (8, 8)}

  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x),
                    in_shardings=(shardings, sharding.batch_sharding(mesh, 4)),
                    out_shardings=sharding.batch_sharding(mesh, 2))
  x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, 4))
  got = forward(params, x_sharded)
  assert got.sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_abstract_shardings_and_sharded_init():
  mesh = _mesh(data=2, fsdp=4)

  def init():
    return nnx.state(_ConvMLP(nnx.Rngs(0)))

  abstract = jax.eval_shape(init)
  shapes = sharding.infer_abstract_params(abstract, [(".*", "fsdp")], mesh)
  flat = tree.flatten(shapes)
  assert isinstance(flat["fc1.kernel"], jax.ShapeDtypeStruct)
  assert flat["fc1.kernel"].sharding.spec == P(None, "fsdp")

  shardings = jax.tree.map(lambda s: s.sharding, shapes)
  params = sharding.init_sharded(init, shardings)
  assert tree.flatten(params)["fc1.kernel"].sharding.spec == P(None, "fsdp")
  np.testing.assert_allclose(np.asarray(tree.flatten(params)["fc1.kernel"]),
                             np.asarray(tree.flatten(init())["fc1.kernel"]))
  with pytest.raises(ValueError, match="init_sharded"):
    sharding.shard_params(abstract, shardings)


# --- batches ------------------------------------------------------------------------


def test_batch_sharding_and_replicated():
  mesh = _mesh(data=2, fsdp=4)
  assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
  assert sharding.batch_sharding(mesh, 1, axes="data").spec == P("data")
  assert sharding.replicated(mesh).spec == P()
  with pytest.raises(ValueError, match="not in the mesh"):
    sharding.batch_sharding(mesh, 2, axes=("model",))


def test_make_global_batch():
  mesh = _mesh(data=2, fsdp=4)
  local = {"latents": np.arange(16 * 4 * 4 * 2, dtype=np.float32).reshape(16, 4, 4, 2),
           "ids": np.arange(16, dtype=np.int32), "scale": np.float32(3.0)}
  batch = sharding.make_global_batch(local, mesh)
  lat = batch["latents"]
  assert lat.shape == (16, 4, 4, 2)        # one process: global == local
  assert lat.sharding.spec == P(("data", "fsdp"), None, None, None)
  assert {s.data.shape for s in lat.addressable_shards} == {(2, 4, 4, 2)}
  assert batch["ids"].sharding.spec == P(("data", "fsdp"))
  assert batch["scale"].sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(lat), local["latents"])
  data_only = sharding.make_global_batch(local["ids"], mesh, axes="data")
  assert {s.data.shape for s in data_only.addressable_shards} == {(8,)}
